"""The decode frame's guard cost against a cache's layout, in a toy: 64 wrapper subclasses (as KiviCacheTensor is),
each over k inner tensors of 1 x 32 x 40 x 32 (4-D) or the same numel (1-D), their token dim marked dynamic or not.
A compiled function reads every inner tensor; its guards are checked against the arguments it was compiled for.
Medians of 5 rounds of 300 checks, warm (CPU caches hot), microseconds. Run: python wrapper_guards_toy.py"""
import dataclasses
import statistics
import time

import torch
import torch._dynamo.guards as dynamo_guards
from tabulate import tabulate
from torch.utils._pytree import tree_map


@dataclasses.dataclass(frozen=True)
class Spec:  # a flatten context like CacheSpec
    per_channel: bool
    bits: int
    group_size: int
    residual_length: int


class Wrapper(torch.Tensor):
    @staticmethod
    def __new__(cls, inner, names, spec):
        return torch.Tensor._make_wrapper_subclass(cls, inner[0].shape, dtype=inner[0].dtype)

    def __init__(self, inner, names, spec):
        self.names, self.spec = names, spec
        for name, tensor in zip(names, inner):
            setattr(self, name, tensor)

    def __tensor_flatten__(self):
        return list(self.names), (self.names, self.spec)

    @staticmethod
    def __tensor_unflatten__(inner, context, size, stride):
        return Wrapper([inner[name] for name in context[0]], *context)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: getattr(x, x.names[0]) if isinstance(x, Wrapper) else x  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class Layer:
    def __init__(self, keys):
        self.keys = keys


def warm_check_us(layers) -> float:
    frames = []
    dynamo_guards.guard_manager_testing_hook_fn = lambda manager, scope, builder: frames.append((manager, dict(scope)))
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def read_all(x, layers):
        for layer in layers:
            for name in layer.keys.names:
                x = x + getattr(layer.keys, name).sum()
        return x

    read_all(torch.ones(1), layers)
    manager, scope = frames[-1]
    assert manager.check(scope)
    return median_check_us(manager, scope)


def median_check_us(manager, scope) -> float:
    """Median of 5 rounds' median over 300 checks of ``manager`` against ``scope``."""
    rounds = []
    for _ in range(5):
        times = []
        for _ in range(300):
            start = time.perf_counter()
            manager.check(scope)
            times.append((time.perf_counter() - start) * 1e6)
        rounds.append(statistics.median(times))
    return statistics.median(rounds)


def main() -> None:
    rows = []
    for flat in (False, True):
        for inner in (1, 5):
            row = ["1-D" if flat else "4-D", inner]
            for dynamic in (False, True):
                names = tuple(f"buffer{i}" for i in range(inner))
                layers = []
                for _ in range(64):
                    tensors = [torch.randn(32 * 40 * 32) if flat else torch.randn(1, 32, 40, 32) for _ in names]
                    wrapper = Wrapper(tensors, names, Spec(True, 2, 32, 128))
                    if dynamic:
                        for tensor in tensors if flat else [wrapper]:  # a wrapper's mark reaches its inner tensors
                            torch._dynamo.maybe_mark_dynamic(tensor, 0 if flat else 2)
                    layers.append(Layer(wrapper))
                row.append(f"{warm_check_us(layers):.0f}")
            rows.append(row)
    print(f"torch {torch.__version__}; 64 wrappers; warm guard check, us")
    print(tabulate(rows, headers=["inner layout", "inner tensors", "static", "token dim dynamic"], tablefmt="github"))


if __name__ == "__main__":
    main()
