"""Quality: streaming decode perplexity of KIVI configurations against fp16, on a model trained here.

No weights can be downloaded, so this trains a small byte-level Llama (GQA: 8 query heads, 2 KV
heads, head dim 64, about 23M parameters, vocab 256) from scratch on text every Python install
has: the standard library's ``*.py`` sources (``sysconfig.get_paths()["stdlib"]``, site-packages
excluded, files sorted by path, read as bytes, each followed by a 0 byte). Every 20th file is held
out for evaluation. Training: fp32 master weights, bf16 autocast, AdamW, linear warm-up then cosine
decay, random windows of the training bytes, for ``--train-seconds`` (the step count is fixed from
the measured speed after a few steps and printed; ``--train-steps N`` repeats it exactly). The
model is saved in the evaluation dtype with ``save_pretrained`` under ``--out``/model (about 46 MB in
fp16); ``--load DIR`` skips training.

Evaluation is what generation does, teacher-forced: ``E`` held-out sequences of ``L`` bytes, as one
batch, in fp16. Prefill the first ``P`` bytes, then feed one byte at a time with the
``DynamicCache`` the previous step returned (the keywords ``generate`` passes: ``input_ids``,
the cache, ``use_cache``), scoring the log-probability of the true next byte
after the prefill and after every fed byte (``L - P`` predictions per sequence). Methods:

- ``fp16``: the plain model (no compile), the same streaming loop: the baseline.
- ``fp16 one forward``: the whole sequence in one forward, no cache, scored on the same positions:
  a sanity check that must equal the streaming baseline up to fp16 rounding.
- ``kivi ...``: ``model.forward = torch.compile(model.forward, backend=kivi_compile.backend(cfg))``
  for K4V4 G32 R128, K2V2 at (G, R) in {(32, 128), (64, 128), (32, 32), (64, 64)} (G must divide R,
  so G64 R32 does not exist), and the paper's ablation K2V2 G32 R128 with keys grouped per token
  (``per_channel_keys=False``); ``torch._dynamo.reset()`` around each.

Why ``P = 64`` (shorter than every R): a prompt of ``P < R`` tokens quantizes nothing in the
prefill, so every quantized key and value enters the cache through the decode path (append, flush
of whole R-token key blocks, the sliding value window), exactly as in a long generation, and every
prediction made at a position past R (about 93% of them for R = 128, P = 64, L = 1024) attends over
a quantized history. Use ``--prefill 512`` to exercise the prefill's own quantization instead. The evaluation
length must exceed R for any difference to appear, and should not exceed the training window (the
model is not trained to extrapolate), so both default to 1024.

The table ends with the perplexity change against the streaming fp16 baseline and its paired
standard error over the ``E`` sequences. Results (and the training summary) go to
``--out``/quality.json, rewritten after each method so a partial run keeps what it measured.

    python benchmarks/quality.py                                          # GPU: train ~180 s, then evaluate
    python benchmarks/quality.py --load benchmarks/results/quality/model  # evaluate a saved model again
    python benchmarks/quality.py --smoke                                  # CPU smoke test, tiny sizes, < 2 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from tabulate import tabulate
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig
from kivi_compile.transformers_names import cache_keyword, returned_cache

SHAPES: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64),  # fmt: skip
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),  # fmt: skip
}
KIVI_METHODS: dict[str, KiviConfig] = {
    "kivi-k4v4-g32-r128": KiviConfig(key_bits=4, value_bits=4, group_size=32, residual_length=128),
    "kivi-k2v2-g32-r128": KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128),
    "kivi-k2v2-g64-r128": KiviConfig(key_bits=2, value_bits=2, group_size=64, residual_length=128),
    "kivi-k2v2-g32-r32": KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=32),
    # G=64 with R=32 is not a valid KIVI setting (keys flush whole G-token groups, so G must divide R):
    # the nearest valid point is R=64.
    "kivi-k2v2-g64-r64": KiviConfig(key_bits=2, value_bits=2, group_size=64, residual_length=64),
    "kivi-k2v2-g32-r128-keys-per-token": KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128,
                                                    per_channel_keys=False),  # fmt: skip
}
# Settings that differ between the GPU run and the CPU smoke test; an explicit flag wins over both.
MODES: dict[str, dict[str, Any]] = {
    "full": dict(shape="small", train_seconds=180.0, batch=16, seq_len=1024, warmup=100, log_every=250,
                 eval_sequences=64, eval_len=1024, prefill=64, out="benchmarks/results/quality"),  # fmt: skip
    "smoke": dict(shape="tiny", train_seconds=None, train_steps=100, batch=8, seq_len=320, warmup=5, log_every=25,
                  eval_sequences=2, eval_len=320, prefill=32, device="cpu",
                  out="benchmarks/results/quality-smoke"),  # fmt: skip
}
DOCUMENT_END = b"\x00"
HOLD_OUT_EVERY = 20


@dataclass
class Corpus:
    """The standard library's sources as bytes: training text, held-out text, and where they came from."""

    train: torch.Tensor  # uint8 [N_train]
    held_out: torch.Tensor  # uint8 [N_eval]
    root: str
    files: int
    held_out_files: int
    sha256: str  # of all the files' bytes in order, to tell whether two runs saw the same text


def load_corpus() -> Corpus:
    """Every ``*.py`` under the stdlib (not site-packages), sorted; every 20th file held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise RuntimeError(f"no *.py files under {root}")
    digest = hashlib.sha256()
    train, held_out = bytearray(), bytearray()
    for index, path in enumerate(paths):
        data = path.read_bytes()
        digest.update(data)
        (held_out if index % HOLD_OUT_EVERY == HOLD_OUT_EVERY // 2 else train).extend(data + DOCUMENT_END)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(held_out), str(root), len(paths),
                  len(range(HOLD_OUT_EVERY // 2, len(paths), HOLD_OUT_EVERY)), digest.hexdigest()[:16])  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def build_model(shape: str, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SHAPES[shape], vocab_size=256, max_position_embeddings=max_positions, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(model: LlamaForCausalLM, corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    """Train on random ``seq_len`` windows of the training bytes; returns the training summary.

    The number of steps is ``--train-steps``, or ``--train-seconds`` divided by the time per step
    measured over steps 5-15 (all inside the warm-up, whose schedule does not depend on the total).
    """
    device = args.device
    data = corpus.train.to(device)
    offsets = torch.arange(args.seq_len, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # on the device: no host sync per step
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
        lr=args.lr, betas=(0.9, 0.95), fused=device == "cuda",
    )  # fmt: skip
    total = args.train_steps
    warmup = args.warmup if total is None else min(args.warmup, max(1, total // 10))
    calibrate = (5, 15)
    if total is None and warmup <= calibrate[1]:
        raise ValueError(f"--warmup={warmup}: must exceed {calibrate[1]} when --train-seconds sets the step count")
    model.train()
    losses: list[tuple[int, float]] = []
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    start = time.perf_counter()
    step = 0
    while total is None or step < total:
        if total is None and step == calibrate[0]:
            synchronize(device)
            calibration_start = time.perf_counter()
        if total is None and step == calibrate[1]:
            synchronize(device)
            per_step = (time.perf_counter() - calibration_start) / (calibrate[1] - calibrate[0])
            total = max(2 * warmup, int(args.train_seconds / per_step))
            print(f"{per_step * 1e3:.1f} ms/step: training for {total} steps "
                  f"(--train-steps {total} repeats this run)", flush=True)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, warmup, total or 10**9)
        starts = torch.randint(0, data.numel() - args.seq_len, (args.batch,), generator=generator, device=device)
        tokens = data[starts[:, None] + offsets].long()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window_loss += loss.detach()
        window_steps += 1
        step += 1
        if step % args.log_every == 0 or step == total:
            mean = float(window_loss) / window_steps
            seconds = time.perf_counter() - window_start
            losses.append((step, mean))
            print(f"step {step:>6}/{total or '?'}  loss {mean:.4f} nats/byte  "
                  f"{window_steps * args.batch * args.seq_len / seconds:,.0f} tok/s  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)  # fmt: skip
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    return dict(steps=step, seconds=seconds, tokens=step * args.batch * args.seq_len, batch=args.batch,
                seq_len=args.seq_len, lr=args.lr, warmup=warmup, seed=args.seed, final_loss=losses[-1][1],
                loss_curve=losses)  # fmt: skip


def eval_sequences(corpus: Corpus, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` held-out bytes at evenly spaced offsets: ``[E, L]`` int64."""
    if corpus.held_out.numel() < length:
        raise ValueError(f"--eval-len={length}: the held-out text has only {corpus.held_out.numel()} bytes")
    starts = torch.linspace(0, corpus.held_out.numel() - length, count).long()
    return corpus.held_out[starts[:, None] + torch.arange(length)].long()


@torch.no_grad()
def streaming_nll(model: LlamaForCausalLM, sequences: torch.Tensor, prefill: int) -> tuple[torch.Tensor, Any, float]:
    """Prefill ``sequences[:, :prefill]``, then feed one token per step with the returned cache.

    Returns the negative log-likelihood of tokens ``prefill .. L-1``, ``[E, L - prefill]`` float32,
    the final cache, and the seconds of the prefill plus the first two decode steps (where the
    graphs compile).
    """
    device = sequences.device.type
    length = sequences.shape[1]
    nll = torch.empty(sequences.shape[0], length - prefill, device=sequences.device)

    def score(logits: torch.Tensor, index: int) -> None:
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        nll[:, index] = -logprobs.gather(1, sequences[:, prefill + index, None])[:, 0]

    start = time.perf_counter()
    keyword = cache_keyword(model.forward)
    out = model(sequences[:, :prefill], **{keyword: DynamicCache(config=model.config)}, use_cache=True)
    score(out.logits, 0)
    warmup_seconds = float("nan")
    for position in range(prefill, length - 1):
        out = model(sequences[:, position : position + 1], **{keyword: returned_cache(out)}, use_cache=True)
        score(out.logits, position - prefill + 1)
        if position == prefill + 1:
            synchronize(device)
            warmup_seconds = time.perf_counter() - start
    return nll, returned_cache(out), warmup_seconds


@torch.no_grad()
def full_sequence_nll(model: LlamaForCausalLM, sequences: torch.Tensor, prefill: int) -> torch.Tensor:
    """The same scores as ``streaming_nll`` from one forward over the whole sequences, no cache."""
    logits = model(sequences, use_cache=False).logits[:, prefill - 1 : -1].float()
    return -torch.log_softmax(logits, dim=-1).gather(2, sequences[:, prefill:, None])[..., 0]


def evaluate(name: str, model: LlamaForCausalLM, sequences: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """One method's row: NLL per sequence plus what the backend did (for KIVI methods).

    ``name`` is a ``KIVI_METHODS`` key, ``"baseline"`` (the plain model, streaming) or
    ``"one-forward"`` (the plain model, whole sequences at once).
    """
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    display = {"baseline": short, "one-forward": f"{short} one forward"}.get(name, name)
    row: dict[str, Any] = dict(method=display)
    config = KIVI_METHODS.get(name)
    if config is not None:
        config = KiviConfig(**{**asdict(config), "compiler": args.compiler})
        row.update(key_bits=config.key_bits, value_bits=config.value_bits, group_size=config.group_size,
                   residual_length=config.residual_length, per_channel_keys=config.per_channel_keys)  # fmt: skip
    eager_forward = model.forward
    backend = kivi_compile.backend(config) if config is not None else None
    torch._dynamo.reset()
    if backend is not None:
        model.forward = torch.compile(eager_forward, backend=backend)
    start = time.perf_counter()
    try:
        if name == "one-forward":
            nll, cache, row["warmup_seconds"] = full_sequence_nll(model, sequences, args.prefill), None, None
        else:
            nll, cache, row["warmup_seconds"] = streaming_nll(model, sequences, args.prefill)
        synchronize(args.device)
    except Exception as error:  # one broken configuration must not cost the others their results
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return row
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()
    row["seconds"] = time.perf_counter() - start
    row["nll_per_sequence"] = nll.mean(dim=1).tolist()
    row["nll"] = nll.mean().item()
    row["perplexity"] = math.exp(row["nll"])
    if backend is not None:
        row["graphs"] = backend.graphs_compiled
        row["sites_rewritten"] = sum(result.rewritten for result in backend.results)
        row["sites"] = sum(len(result.sites) for result in backend.results)
        row["quantized_cache_layers"] = sum(isinstance(layer.keys, KiviCacheTensor) for layer in cache.layers)
    return row


def with_deltas(rows: list[dict[str, Any]], baseline: str) -> None:
    """Perplexity change against ``baseline`` (%) and its paired standard error over sequences."""
    reference = next((r for r in rows if r["method"] == baseline and "nll" in r), None)
    for row in rows:
        if reference is None or "nll" not in row:
            continue
        if row is reference:
            row["delta_percent"], row["delta_stderr_percent"] = 0.0, None
            continue
        row["delta_percent"] = 100.0 * (row["perplexity"] / reference["perplexity"] - 1.0)
        diffs = torch.tensor(row["nll_per_sequence"]) - torch.tensor(reference["nll_per_sequence"])
        row["delta_stderr_percent"] = 100.0 * diffs.std().item() / math.sqrt(len(diffs)) if len(diffs) > 1 else None


def table(rows: list[dict[str, Any]], baseline: str) -> str:
    lines = []
    for r in rows:
        kivi = "key_bits" in r
        keys = ("per-channel" if r["per_channel_keys"] else "per-token") if kivi else "-"
        bits = f"K{r['key_bits']}V{r['value_bits']}" if kivi else "-"
        sites = f"{r['sites_rewritten']}/{r['sites']}" if "sites" in r else "-"
        quantized = r.get("quantized_cache_layers", "-")
        if "error" in r:
            lines.append([r["method"], keys, bits, r.get("group_size", "-"), r.get("residual_length", "-"),
                          "-", "-", "-", "-", "-", "ERROR: " + r["error"][:60], "", ""])  # fmt: skip
            continue
        stderr = r.get("delta_stderr_percent")
        lines.append([r["method"], keys, bits, r.get("group_size", "-"), r.get("residual_length", "-"),
                      r.get("graphs", "-"), sites, quantized,
                      f"{r['warmup_seconds']:.1f}" if r.get("warmup_seconds") is not None else "-",
                      f"{r['seconds']:.1f}", f"{r['perplexity']:.4f}", f"{r.get('delta_percent', float('nan')):+.3f}",
                      f"{stderr:.3f}" if stderr is not None else "-"])  # fmt: skip
    headers = ["method", "keys", "bits", "G", "R", "graphs", "sites rewritten", "KIVI layers",
               "prefill + 2 steps s", "eval s", "perplexity", f"delta vs {baseline} (%)", "± (%)"]  # fmt: skip
    return tabulate(lines, headers=headers, tablefmt="github")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
        python=sys.version.split()[0], date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    )  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, 100 steps, short eval")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--compiler", choices=["inductor", "eager"], default=None,
                        help="KIVI backend compiler (default: inductor on CUDA, eager on CPU)")  # fmt: skip
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="evaluation dtype (default: float16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--load", default=None, help="a saved model directory: skip training")
    parser.add_argument("--out", default=None, help="where the model and quality.json go")
    parser.add_argument("--shape", choices=list(SHAPES), default=None)
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--train-steps", type=int, default=None, help="fixed step count (overrides --train-seconds)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="training window (bytes)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-sequences", type=int, default=None, help="E: held-out sequences, one batch")
    parser.add_argument("--eval-len", type=int, default=None, help="L: bytes per evaluation sequence")
    parser.add_argument("--prefill", type=int, default=None, help="P: bytes prefilled before streaming")
    parser.add_argument(
        "--methods", default=",".join(["one-forward", *KIVI_METHODS]),
        help="comma-separated: one-forward, KIVI_METHODS keys (the streaming baseline always runs)",
    )  # fmt: skip
    args = parser.parse_args()
    for key, value in {**MODES["full"], **MODES["smoke" if args.smoke else "full"]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compiler is None:
        args.compiler = "inductor" if args.device == "cuda" else "eager"
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.train_steps is not None:
        args.train_seconds = None
    if not 0 < args.prefill < args.eval_len:
        parser.error(f"--prefill={args.prefill}: must be in (0, --eval-len={args.eval_len})")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    print(f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, "
          f"python {env['python']}; {env['date']}", flush=True)  # fmt: skip
    seed_everything(args.seed)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")

    corpus = load_corpus()
    print(f"corpus: {corpus.files} files under {corpus.root} (sha256 {corpus.sha256}), "
          f"{corpus.train.numel() / 1e6:.1f} MB train, {corpus.held_out.numel() / 1e6:.2f} MB held out "
          f"({corpus.held_out_files} files)", flush=True)  # fmt: skip

    if args.load:
        model = LlamaForCausalLM.from_pretrained(args.load, attn_implementation="sdpa")
        summary_path = Path(args.load) / "train_summary.json"
        training = json.loads(summary_path.read_text()) if summary_path.exists() else dict(loaded_from=args.load)
        training["loaded_from"] = args.load
    else:
        model = build_model(args.shape, max(args.seq_len, args.eval_len)).to(args.device)
        print(f"model: {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; training",
              flush=True)  # fmt: skip
        training = train(model, corpus, args)
        model.to(getattr(torch, args.dtype)).save_pretrained(out / "model")  # what is evaluated, half the bytes
        (out / "model" / "train_summary.json").write_text(json.dumps(training, indent=1))
        print(f"saved to {out / 'model'}", flush=True)
    parameters = sum(p.numel() for p in model.parameters())
    if model.config.max_position_embeddings < args.eval_len:
        positions = model.config.max_position_embeddings
        raise ValueError(f"--eval-len={args.eval_len} exceeds the model's {positions} positions")
    dtype = getattr(torch, args.dtype)
    model = model.to(device=args.device, dtype=dtype).eval()

    sequences = eval_sequences(corpus, args.eval_sequences, args.eval_len).to(args.device)
    header = (f"byte-level Llama, {parameters / 1e6:.2f}M parameters ({model.config.num_hidden_layers} layers, "
              f"{model.config.num_attention_heads} query / {model.config.num_key_value_heads} KV heads, head dim "
              f"{model.config.head_dim}), trained {training.get('steps', '?')} steps to loss "
              f"{training.get('final_loss', float('nan')):.4f} nats/byte; eval {args.eval_sequences} held-out "
              f"sequences x {args.eval_len} bytes, prefill {args.prefill}, {args.eval_len - args.prefill} scored "
              f"each, {args.dtype}, kivi compiler {args.compiler}; on {env['device']}, torch {env['torch']}, "
              f"transformers {env['transformers']}, triton {env['triton']}, {env['date']}")  # fmt: skip
    print(header, flush=True)

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("baseline", "one-forward", *KIVI_METHODS)]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from one-forward, {', '.join(KIVI_METHODS)}")
    names = ["baseline", *(n for n in names if n != "baseline")]
    rows: list[dict[str, Any]] = []
    result = dict(header=header, environment=env, args=vars(args), parameters=parameters,
                  model_config=model.config.to_dict(), corpus={k: v for k, v in asdict(corpus).items()
                                                               if not isinstance(v, torch.Tensor)},
                  training=training, rows=rows)  # fmt: skip
    for name in names:
        row = evaluate(name, model, sequences, args)
        rows.append(row)
        with_deltas(rows, rows[0]["method"])
        status = row.get("error") or (f"perplexity {row['perplexity']:.4f} ({row.get('delta_percent', 0):+.3f}%), "
                                      f"{row['seconds']:.1f} s, graphs {row.get('graphs', '-')}")  # fmt: skip
        print(f"{row['method']:>34}: {status}", flush=True)
        (out / "quality.json").write_text(json.dumps(result, indent=1, default=str))

    print()
    print(header)
    print(f"parameters {parameters:,}; final train loss {training.get('final_loss', float('nan')):.4f} nats/byte "
          f"after {training.get('steps', '?')} steps ({training.get('seconds', float('nan')):.0f} s)")  # fmt: skip
    print(table(rows, rows[0]["method"]))
    print(f"wrote {out / 'quality.json'}")


if __name__ == "__main__":
    main()
