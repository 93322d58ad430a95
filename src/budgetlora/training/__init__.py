"""Training: the rows a run trains on (prepare, the noisy-label pass), the loop, one config -> one run folder
(train), batched evaluation and metrics, the artifacts a run leaves behind (metrics, plots, card), tracking."""
