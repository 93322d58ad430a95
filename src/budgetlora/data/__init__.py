"""Data: read sources into validated (texts, labels) splits, turn texts into token batches, and the train-time
text strategies (augmentation, row filters). Nothing here knows about models or adapters."""
