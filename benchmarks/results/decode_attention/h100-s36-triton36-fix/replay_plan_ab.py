"""A/B on the replay-plan code: per small-batch shape, the tuned (launched, replayed) plans, then every candidate
plan forced (both slots) and timed do_bench (host in) and replayed from a CUDA graph (GPU alone); plus the Gluon
path forced (MMA_MIN_TOKEN_HEADS 0) and ONE_ROW_TILE added to the tiles. Output differences vs the launched plan."""
import os
import torch
from tabulate import tabulate
from kivi_compile.cache import KiviCacheTensor
from kivi_compile.config import KiviConfig
from kivi_compile.kernels import decode_attention as da

SHAPES = [(1, 32, 32, 340), (1, 32, 32, 500), (1, 32, 8, 340), (1, 32, 32, 1024), (1, 32, 32, 2048),
          (2, 32, 32, 340), (4, 32, 32, 340), (8, 32, 32, 340)]
if os.environ.get("SHAPES"):
    SHAPES = [SHAPES[int(i)] for i in os.environ["SHAPES"].split(",")]
orig_configs = da._configs
rows = []


def row(name, shape, plan, launch, base, base_times, sdpa_gpu):
    out = launch()
    host_ms, gpu_ms = da.median_ms(launch), da.replayed_ms(launch)
    diff = ((out.float() - base).norm() / base.norm()).item()
    batch, heads, kv_heads, seq_len = shape
    rows.append(dict(B=batch, H=f"{heads}/{kv_heads}", T=seq_len, variant=name, plan=str(plan),
                     do_bench_ms=round(host_ms, 4), gpu_ms=round(gpu_ms, 4),
                     x_host=round(base_times[0] / host_ms, 3), x_gpu=round(base_times[1] / gpu_ms, 3),
                     sdpa_gpu_ms=round(sdpa_gpu, 4), rel_diff=f"{diff:.1e}"))
    print(rows[-1], flush=True)


for shape in SHAPES:
    batch, heads, kv_heads, seq_len = shape
    torch.manual_seed(0)
    config = KiviConfig(key_bits=2, value_bits=2, group_size=32, residual_length=128)
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.float16)
    keys = torch.randn(batch, kv_heads, seq_len, 128, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    key = KiviCacheTensor.from_dense(keys, config.key_spec()).kv
    value = KiviCacheTensor.from_dense(values, config.value_spec()).kv
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=kv_heads != heads)
    sdpa_gpu = da.replayed_ms(sdpa)
    attention = lambda: da.decode_attention_triton(q, key, value, None, None, False, 2, 2, 32)
    da.MMA_MIN_TOKEN_HEADS = 1 << 17
    da._TUNED_PLANS.clear()
    if da.uses_mma_path(q, key, value, False, 2, 2, 32):
        print("skipped (Gluon path)", shape)
        continue
    attention()  # tunes
    ((key_, tuned),) = da._TUNED_PLANS.items()
    print(shape, "tuned: launched", tuned.launched, "replayed", tuned.replayed, flush=True)
    da._TUNED_PLANS[key_] = da._TunedPlans(tuned.launched, tuned.launched)
    base = attention().float()
    base_times = (da.median_ms(attention), da.replayed_ms(attention))
    for plan in da._candidate_plans():
        da._TUNED_PLANS[key_] = da._TunedPlans(plan, plan)
        tag = "launched" if plan == tuned.launched else "replayed" if plan == tuned.replayed else "other"
        row(tag, shape, plan, attention, base, base_times, sdpa_gpu)
    da._TUNED_PLANS[key_] = tuned
    row("tuned pair", shape, f"{tuned.launched} / {tuned.replayed}", attention, base, base_times, sdpa_gpu)
    try:
        da._configs = lambda: [*orig_configs(), da.ONE_ROW_TILE]
        da._TUNED_PLANS.clear()
        attention()
        ((_, one_row),) = da._TUNED_PLANS.items()
        row("+1row tuned", shape, f"{one_row.launched} / {one_row.replayed}", attention, base, base_times, sdpa_gpu)
    except Exception as error:  # noqa: BLE001 - an A/B: report and go on
        print("one-row failed", shape, repr(error)[:300])
    finally:
        da._configs = orig_configs
    try:
        da.MMA_MIN_TOKEN_HEADS = 0
        da._TUNED_TAIL_TILES.clear()
        row("gluon", shape, "gluon + tail", attention, base, base_times, sdpa_gpu)
    except Exception as error:  # noqa: BLE001
        print("gluon failed", shape, repr(error)[:300])
    finally:
        da.MMA_MIN_TOKEN_HEADS = 1 << 17
print(torch.cuda.get_device_name(), torch.__version__)
print(tabulate(rows, headers="keys"))
