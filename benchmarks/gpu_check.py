"""What one GPU does with this project, in one short script.

1. Throughput: the RoBERTa-base architecture with random weights (speed does not depend on the values) plus LoRA
   r=8 on query/value and the trained head, bf16 autocast, batches of realistic AG News lengths (MiniLM token
   lengths of the train file, or a fixed log-normal with mean ~54 and p95 ~83 tokens when the file is absent),
   length-grouped as budgetlora batches them. Prints training samples/s, tokens/s and the model-FLOPs utilisation
   against the card's bf16 dense peak (--peak-flops, default 989e12: H100 SXM).

   FLOPs per padded token = 4 * N_linear + 2 * N_trainable_linear + 12 * L * S * d
     N_linear:   weights of every matmul the token goes through (encoder Linear layers, LoRA A/B, pooler, head;
                 embeddings are lookups and count 0). Forward is 2 * N; the backward still needs activation
                 gradients through the frozen weights (another 2 * N) but weight gradients (2 * N) only for the
                 trainable LoRA and head matrices, hence 4 * N + 2 * N_trainable rather than the 6 * N of full
                 fine-tuning.
     12*L*S*d:   attention scores and weighted sums (QK^T, AV: 4 * S * d per token per layer forward, x3 with the
                 backward), S = the padded batch width, L layers, d hidden size.
   Padded positions are counted because the GPU computes them; the non-padding token rate is printed as well.

2. Accuracy: budgetlora.train.train on the embedded MiniLM (--model-dir: a folder, e.g. an fp16 copy made with
   --save-fp16 to keep the carried files small; it is widened to fp32 before training) for one epoch on the
   shipped train split, then the test accuracy.

    python benchmarks/gpu_check.py --smoke                      # tiny sizes, runs on CPU in about a minute
    python benchmarks/gpu_check.py --save-fp16 minilm-fp16      # once, where the embedded model is installed
    python benchmarks/gpu_check.py --model-dir minilm-fp16      # on the GPU machine
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def token_lengths(n: int, seed: int, train_file: str | None, tokenizer_dir: str) -> tuple[np.ndarray, str]:
    """n sampled lengths (special tokens included) of AG News texts under the MiniLM tokenizer."""
    rng = np.random.default_rng(seed)
    if train_file and Path(train_file).is_file():
        import pandas as pd
        from transformers import AutoTokenizer

        texts = pd.read_csv(train_file, dtype=str, keep_default_na=False)["text"].tolist()
        texts = [texts[i] for i in rng.choice(len(texts), min(len(texts), 20_000), replace=False)]
        lens = np.array([len(x) for x in AutoTokenizer.from_pretrained(tokenizer_dir)(texts)["input_ids"]])
        source = f"MiniLM token lengths of {len(texts):,} texts from {train_file}"
    else:  # log-normal fitted to those lengths: mean ~54, p95 ~83
        lens = np.clip(np.round(rng.lognormal(np.log(51.5), 0.3, 20_000)), 8, 512).astype(int)
        source = "fixed log-normal distribution"
    out = rng.choice(lens, n)
    return out, f"{source}: mean {out.mean():.1f}, p95 {np.percentile(out, 95):.0f}, max {out.max()}"


def linear_params(model) -> tuple[int, int]:
    n = trainable = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            n += m.weight.numel()
            trainable += m.weight.numel() if m.weight.requires_grad else 0
    return n, trainable


def throughput(args, device) -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from budgetlora.data import length_grouped_batches

    if args.smoke:
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               num_labels=4)
    else:  # exactly roberta-base's shapes
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               num_labels=4)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                            target_modules=["query", "value"], modules_to_save=["classifier"]))
    model.to(device).train()
    n_linear, n_train_linear = linear_params(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    L, d = config.num_hidden_layers, config.hidden_size

    steps = args.warmup_steps + args.steps
    lengths, desc = token_lengths(steps * args.batch_size, args.seed, args.lengths_from, args.tokenizer_dir)
    lengths = np.minimum(lengths, args.max_length)
    batches = length_grouped_batches(lengths, args.batch_size, args.seed, 0)[:steps]
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda" or None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    print(f"[throughput] roberta-base architecture{' (smoke: tiny)' if args.smoke else ''}, random weights, "
          f"LoRA r=8 q,v + head: {n_trainable:,} trainable; {n_linear:,} matmul weights; "
          f"{'bf16 autocast' if use_bf16 else 'fp32'} on {device}")
    print(f"[throughput] lengths: {desc}; batch {args.batch_size}, length-grouped, {args.steps} timed steps "
          f"after {args.warmup_steps} warm-up steps")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens = padded = flops = 0.0
    t0 = 0.0
    for i, rows in enumerate(batches):
        if i == args.warmup_steps:
            sync()
            t0 = time.perf_counter()
        width = int(lengths[rows].max())
        ids = torch.randint(3, config.vocab_size, (len(rows), width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths[rows])[:, None]).long()
        ids = ids.masked_fill(mask == 0, config.pad_token_id)
        labels = torch.randint(0, 4, (len(rows),), generator=gen)
        ids, mask, labels = ids.to(device, non_blocking=True), mask.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup_steps:
            tokens += float(lengths[rows].sum())
            padded += len(rows) * width
            flops += len(rows) * width * (4 * n_linear + 2 * n_train_linear + 12 * L * width * d)
    sync()
    dt = time.perf_counter() - t0
    samples = args.steps * args.batch_size
    achieved = flops / dt
    print(f"[throughput] {samples / dt:,.1f} samples/s, {tokens / dt:,.0f} tokens/s "
          f"({padded / dt:,.0f} padded tokens/s, padding {1 - tokens / padded:.1%}), {achieved / 1e12:.2f} TFLOP/s")
    print(f"[throughput] MFU {achieved / args.peak_flops:.2%} of {args.peak_flops / 1e12:.0f} TFLOP/s "
          f"(FLOPs/token = 4*N_linear + 2*N_trainable_linear + 12*L*S*d, N_linear={n_linear:,}, "
          f"N_trainable_linear={n_train_linear:,}, L={L}, d={d})")
    if device.type == "cuda":
        print(f"[throughput] peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    del model, opt


def widened_copy(model_dir: str) -> str:
    """The model in fp32 in a temporary folder (an fp16 copy would otherwise load, and train, in fp16)."""
    from transformers import AutoModel, AutoTokenizer

    out = tempfile.mkdtemp(prefix="minilm-fp32-")
    AutoModel.from_pretrained(model_dir, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def accuracy(args) -> None:
    from budgetlora.config import Config
    from budgetlora.runs import read_json
    from budgetlora.train import train

    model_dir = widened_copy(args.model_dir)
    overrides = {"model.name": model_dir, "train.epochs": 1.0, "train.lr": args.lr, "train.warmup": args.warmup,
                 "train.batch_size": args.train_batch_size, "train.eval_every": args.eval_every}
    if args.train_file:
        overrides["data.train"] = args.train_file
    if args.test_file:
        overrides["data.test"] = args.test_file
    if args.smoke:
        overrides.update({"data.train_limit": 200, "data.test_limit": 100, "train.max_steps": 5,
                          "model.max_length": 32, "train.eval_every": 5})
    cfg = Config().replace(**overrides)
    t = time.perf_counter()
    run = train(cfg, root=tempfile.mkdtemp(prefix="gpu-check-"), force=True)
    m = read_json(run / "metrics.json")
    print(f"[accuracy] embedded MiniLM (all-MiniLM-L6-v2) LoRA, {m['steps']} steps "
          f"(1 epoch{', smoke: capped' if args.smoke else ''}), lr {cfg.train.lr}, batch {cfg.train.batch_size}: "
          f"val acc {m['val_accuracy']:.4f}, test acc {m['test_accuracy']:.4f} "
          f"({sum(map(sum, m['test_confusion_matrix'])):,} rows), train {m['train_time_s']:.0f}s, "
          f"end to end {time.perf_counter() - t:.0f}s")


def main(argv=None) -> None:
    from budgetlora.architectures import resolve_name
    from budgetlora.data import default_data_dir

    data_dir = default_data_dir()
    default_train = str(data_dir / "train.csv.gz") if data_dir and (data_dir / "train.csv.gz").is_file() else None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and data, so that the script can be tried on CPU")
    p.add_argument("--peak-flops", type=float, default=989e12, help="the card's dense bf16 peak (H100 SXM: 989e12)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lengths-from", default=default_train, help="train file whose token lengths are sampled")
    p.add_argument("--model-dir", default="", help="MiniLM folder (default: the embedded copy)")
    p.add_argument("--save-fp16", default="", metavar="DIR", help="write an fp16 copy of the MiniLM there and exit")
    p.add_argument("--train-file", default="", help="train source (default: the shipped split)")
    p.add_argument("--test-file", default="")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--skip", choices=["throughput", "accuracy"], action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.model_dir = args.model_dir or resolve_name("minilm")
    args.tokenizer_dir = args.model_dir
    if args.save_fp16:
        from transformers import AutoModel, AutoTokenizer

        AutoModel.from_pretrained(args.model_dir, dtype=torch.float16).save_pretrained(args.save_fp16)
        AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(args.save_fp16)
        print(f"wrote an fp16 copy of {args.model_dir} to {args.save_fp16}")
        return
    if args.smoke:
        args.steps, args.warmup_steps, args.batch_size = min(args.steps, 3), min(args.warmup_steps, 1), 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}")
    if "throughput" not in args.skip:
        throughput(args, device)
    if "accuracy" not in args.skip:
        accuracy(args)


if __name__ == "__main__":
    main()
