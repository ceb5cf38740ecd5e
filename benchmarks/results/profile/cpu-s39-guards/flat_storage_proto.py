"""Prototype of the layout the guard profile points to: a cache wrapper over ONE 2-D storage [units, bytes per unit]
(static stride, one dynamic dim) whose codes, scales and minima are views made in ``__tensor_unflatten__``, and a
residual held 3-D (so the wrapper's dynamic token dim is not mirrored onto it). 64 caches; the traced function
touches only the wrapper (as HF's code does; the views are read in ``__torch_dispatch__``). Does Dynamo honour the
storage's dynamic mark, compile once across growth and match eager, and how long do its guards take, beside today's
layout (five buffers flattened, the wrapper's token dim marked dynamic)? Run: python flat_storage_proto.py"""
import torch
import torch._dynamo.guards as dynamo_guards
from torch.utils._pytree import tree_map
from wrapper_guards_toy import Layer, median_check_us

B, H, CODE_COLS, SCALE_COLS = 1, 32, 32, 32
BYTES_PER_UNIT = B * H * (CODE_COLS + 2 * 2 * SCALE_COLS)  # uint8 codes, float16 scales and minima


def buffer_views(storage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    units = storage.shape[0]
    flat = storage.view(-1)
    n_codes, n_scales = B * H * units * CODE_COLS, B * H * units * SCALE_COLS * 2
    codes = flat[:n_codes].view(B, H, units, CODE_COLS)
    scales = flat[n_codes : n_codes + n_scales].view(torch.float16).view(B, H, units, SCALE_COLS)
    mins = flat[n_codes + n_scales : n_codes + 2 * n_scales].view(torch.float16).view(B, H, units, SCALE_COLS)
    return codes, scales, mins


class FlatCache(torch.Tensor):
    @staticmethod
    def __new__(cls, storage, residual, buffers=None, seq_len=None):  # seq_len: the logical tokens, which grow
        shape = (*residual.shape[:2], seq_len or residual.shape[2], residual.shape[3])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=residual.dtype)

    def __init__(self, storage, residual, seq_len=None):
        # The residual is held 3-D, so that Dynamo does not mirror the wrapper's dynamic token dim onto it.
        self.storage, self.residual_rows = storage, residual.flatten(1, 2)
        self.residual = residual
        self.codes, self.scales, self.mins = buffer_views(storage)

    def __tensor_flatten__(self):
        return ["storage", "residual_rows"], None

    @staticmethod
    def __tensor_unflatten__(inner, context, size, stride):
        rows = inner["residual_rows"]
        return FlatCache(inner["storage"], rows.view(rows.shape[0], H, -1, rows.shape[-1]), seq_len=size[2])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.sum.default:
            return summary(args[0])
        unwrap = lambda x: x.residual if isinstance(x, FlatCache) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class FiveBuffers(FlatCache):
    """Today's layout: the same buffers as separate tensors, each one an inner tensor of the wrapper."""

    def __init__(self, storage, residual, buffers=None, seq_len=None):
        self.storage, self.residual = storage, residual
        self.codes, self.scales, self.mins = buffers[:3] if buffers else [t.clone() for t in buffer_views(storage)]
        self.lengths = buffers[3] if buffers else torch.zeros(4, dtype=torch.int64)

    def __tensor_flatten__(self):
        return ["codes", "scales", "mins", "residual", "lengths"], None

    @staticmethod
    def __tensor_unflatten__(inner, context, size, stride):
        buffers = [inner[name] for name in ("codes", "scales", "mins", "lengths")]
        return FiveBuffers(None, inner["residual"], buffers, seq_len=size[2])


def summary(cache: FlatCache) -> torch.Tensor:
    return cache.codes.float().sum() + (cache.scales.float() * cache.mins.float()).sum() + cache.residual.sum()


def new_cache(layout: type, units: int) -> FlatCache:
    storage = torch.randint(0, 60, (units, BYTES_PER_UNIT), dtype=torch.uint8)  # small bytes: finite float16
    cache = layout(storage, torch.randn(B, H, 128, 128), seq_len=units * 4)
    torch._dynamo.maybe_mark_dynamic(cache, 2)  # as KiviCacheTensor.mark_dynamic: mirrored onto 4-D inner tensors
    if layout is FlatCache:
        torch._dynamo.maybe_mark_dynamic(storage, 0)
    return cache


frames = []
dynamo_guards.guard_manager_testing_hook_fn = lambda manager, scope, builder: frames.append((manager, dict(scope)))
print(f"torch {torch.__version__}")
for layout in (FiveBuffers, FlatCache):
    torch._dynamo.reset()
    frames.clear()

    @torch.compile(backend="eager")
    def step(x, layers):
        for layer in layers:
            x = x + layer.keys.sum()
        return x

    for units in (40, 48, 64):  # a growth of every cache
        layers = [Layer(new_cache(layout, units)) for _ in range(64)]
        expected = sum(summary(layer.keys) for layer in layers)
        out = step(torch.zeros(1), layers)
        print(f"{layout.__name__}, units {units}: frames compiled so far {len(frames)}, "
              f"matches eager: {torch.allclose(out, expected)}")
    manager, scope = frames[-1]
    relations = [line for guard in manager.root.get_epilogue_lambda_guards() for line in guard.verbose_code_parts()]
    print(f"{layout.__name__}: guards pass: {manager.check(scope)}; warm check {median_check_us(manager, scope):.0f} us "
          f"(medians of 5 rounds of 300); {len(relations)} shape relations")
