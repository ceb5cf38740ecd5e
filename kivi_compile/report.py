"""What the KIVI pass did, per Dynamo graph and per attention site, for people and for tools.

``Report.from_backend(backend)`` reads a ``KiviBackend``'s ``results`` (one per graph Dynamo handed
it) without re-deriving anything: where each attention site comes from, which pattern it is,
whether it was rewritten and why not, its K/V shape and what a token costs in its cache. The report
renders as a table (``table``), a unified diff of each graph's code before and after the rewrite
(``diff``), text or Markdown for a terminal or a PR, and a JSON-ready dict that round-trips.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from kivi_compile.config import KiviConfig
from kivi_compile.dynamo_backend import KiviBackend
from kivi_compile.passes import SiteRecord

REPORT_VERSION = 1
FP16_BYTES = 2


def fp16_bytes_per_token(kv_heads: int, head_dim: int) -> int:
    """Bytes one token adds to one attention layer's fp16 K and V cache: 2 tensors x H x D x 2 bytes."""
    return 2 * kv_heads * head_dim * FP16_BYTES


def kivi_bytes_per_token(kv_heads: int, head_dim: int, config: KiviConfig) -> int:
    """Bytes one token adds to one attention layer's KIVI K and V cache, once it is quantized.

    Codes: ``bits / 8`` bytes per element. Each group of G elements also stores an fp16 scale and
    minimum (2 params x 2 bytes). Keys are grouped per channel over G tokens, so a token adds
    ``2 * 2 / G`` bytes per channel; values are grouped per token over G channels, so a token adds
    ``2 * 2`` bytes per G channels. Both come to ``4 / G`` bytes per element, so keys grouped per
    token (``per_channel_keys=False``) cost the same. The full-precision residual (at most R tokens
    per sequence) is a constant, not a per-token cost, and is left out.
    """
    elements = kv_heads * head_dim
    codes = elements * (config.key_bits + config.value_bits) // 8
    key_params = elements * 2 * FP16_BYTES // config.group_size  # per channel: 2 params per G tokens
    value_params = kv_heads * (head_dim // config.group_size) * 2 * FP16_BYTES  # per token: 2 per G channels
    return codes + key_params + value_params


@dataclass(frozen=True)
class SiteReport:
    """One attention site of one graph: the pass's ``SiteRecord`` plus its cache cost per token."""

    graph: int
    attention: str  # node name in the Dynamo graph
    module: str  # qualified module path ('' at the top level of what was compiled)
    location: str  # innermost user-code frame: 'File "...", line N, in fn'
    pattern: str  # "sdpa" or "eager"
    phase: str  # "prefill", "decode" or "unknown"
    rewritten: bool
    reason: str | None
    kv_source: str  # the graph input holding the KIVI cache (decode), '' otherwise
    kv_heads: int | None
    query_heads: int | None
    head_dim: int | None
    fp16_bytes_per_token: int | None
    kivi_bytes_per_token: int | None  # None unless rewritten

    @classmethod
    def from_record(cls, graph: int, record: SiteRecord, config: KiviConfig) -> SiteReport:
        known = record.kv_heads is not None and record.head_dim is not None
        fp16 = fp16_bytes_per_token(record.kv_heads, record.head_dim) if known else None
        kivi = kivi_bytes_per_token(record.kv_heads, record.head_dim, config) if known and record.rewritten else None
        return cls(
            graph, record.attention, record.module, record.location, record.pattern, record.phase,
            record.rewritten, record.reason, record.kv_source, record.kv_heads, record.query_heads,
            record.head_dim, fp16, kivi,
        )  # fmt: skip

    @property
    def head_sharing(self) -> str:
        """"MHA", "GQA n:1" or "MQA" from the head counts; '' when the pass did not read them."""
        if self.kv_heads is None or self.query_heads is None:
            return ""
        if self.kv_heads == self.query_heads:
            return "MHA"
        if self.kv_heads == 1:
            return "MQA"
        return f"GQA {self.query_heads // self.kv_heads}:1"

    @property
    def source(self) -> str:
        """The location as ``file.py:line`` (the full path stays in ``location``)."""
        found = re.match(r'File "(?:.*/)?([^/"]+)", line (\d+)', self.location)
        return f"{found.group(1)}:{found.group(2)}" if found else self.location


@dataclass(frozen=True)
class GraphReport:
    """One Dynamo graph: its code before and after the rewrite, and its attention sites."""

    index: int
    code_before: str
    code_after: str
    sites: tuple[SiteReport, ...]
    step_graph: str = ""  # decode graphs: whether the step replays from CUDA graphs, or why not

    @property
    def phase(self) -> str:
        phases = [p for p in dict.fromkeys(site.phase for site in self.sites) if p != "unknown"]
        if phases:
            return "+".join(phases)
        return "unknown" if self.sites else "no attention"

    @property
    def title(self) -> str:
        return f"graph {self.index} ({self.phase})"

    def diff(self, color: bool = False, context: int = 3) -> str:
        """Unified diff (difflib) of the graph's code before vs after the rewrite, or a line saying unchanged.

        The ``forward`` signature is split one input per line, so flattened cache inputs show as
        their own lines.
        """
        lines = difflib.unified_diff(
            _readable(self.code_before), _readable(self.code_after),
            f"{self.title} before", f"{self.title} after KIVI", n=context, lineterm="",
        )  # fmt: skip
        painted = [_paint_diff_line(line, color) for line in lines]
        return "\n".join(painted) if painted else f"{self.title}: unchanged"


@dataclass(frozen=True)
class Report:
    """Everything one backend did, graph by graph; see the module docstring."""

    config: KiviConfig
    graphs: tuple[GraphReport, ...]

    @classmethod
    def from_backend(cls, backend: KiviBackend) -> Report:
        graphs = tuple(
            GraphReport(
                index,
                result.code_before,
                result.graph_module.code,
                tuple(SiteReport.from_record(index, record, backend.config) for record in result.sites),
                result.step_graph,
            )
            for index, result in enumerate(backend.results)
        )
        return cls(backend.config, graphs)

    @property
    def sites(self) -> list[SiteReport]:
        return [site for graph in self.graphs for site in graph.sites]

    def headline(self) -> str:
        c = self.config
        sites = self.sites
        keys = "" if c.per_channel_keys else " (keys per token)"
        return (
            f"KIVI K{c.key_bits}V{c.value_bits} G={c.group_size} R={c.residual_length}{keys}: "
            f"{len(self.graphs)} graph(s), {len(sites)} attention site(s), {sum(s.rewritten for s in sites)} rewritten"
        )

    def table(self, tablefmt: str = "simple", color: bool = False) -> str:
        """One row per attention site (tabulate's ``tablefmt``); ``color`` paints the rewritten column."""
        rows = [
            [
                site.graph,
                site.phase,
                site.module or "(top level)",
                site.source or "-",
                "SDPA" if site.pattern == "sdpa" else site.pattern,
                f"{site.query_heads}/{site.kv_heads} {site.head_sharing}" if site.head_sharing else "-",
                site.head_dim if site.head_dim is not None else "-",
                _kv_source(site),
                _paint("yes", "32", color) if site.rewritten else _paint("no", "31", color),
                _or_dash(site.fp16_bytes_per_token),
                _or_dash(site.kivi_bytes_per_token),
                site.reason or "-",
            ]
            for site in self.sites
        ]
        headers = ["graph", "phase", "module", "source", "attention", "heads q/kv", "head dim", "KV source",
                   "rewritten", "fp16 B/token", "KIVI B/token", "reason"]  # fmt: skip
        align = ["right", "left", "left", "left", "left", "left", "right", "left", "left", "right", "right", "left"]
        return tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=align, disable_numparse=True)

    def summary(self) -> list[str]:
        """One line per graph: sites rewritten and, over the rewritten sites, K/V bytes per token."""
        lines = []
        for graph in self.graphs:
            rewritten = [site for site in graph.sites if site.rewritten]
            line = f"{graph.title}: {len(rewritten)} of {len(graph.sites)} attention site(s) rewritten"
            if rewritten:
                fp16 = sum(site.fp16_bytes_per_token for site in rewritten)
                kivi = sum(site.kivi_bytes_per_token for site in rewritten)
                line += f"; K/V cache per token over them: fp16 {fp16} B, KIVI {kivi} B ({fp16 / kivi:.1f}x smaller)"
            if graph.step_graph:
                line += f"; {graph.step_graph}"
            lines.append(line)
        return lines

    def diff(self, color: bool = False, context: int = 3) -> str:
        """``GraphReport.diff`` of every graph, one after the other."""
        return "\n".join(graph.diff(color, context) for graph in self.graphs)

    def to_text(self, diff: bool = True, color: bool = False) -> str:
        """Headline, table, per-graph summary and (optionally) the diff, for a terminal."""
        parts = [self.headline(), "", self.table(color=color), "", *self.summary()]
        if diff:
            parts += ["", self.diff(color=color)]
        return "\n".join(parts)

    def to_markdown(self, diff: bool = True) -> str:
        """The same content as ``to_text``, as GitHub Markdown (the diff in a fenced block)."""
        parts = [f"**{self.headline()}**", "", self.table(tablefmt="github"), "", *(f"- {s}" for s in self.summary())]
        if diff:
            parts += ["", "```diff", self.diff(), "```"]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: config, and per graph its code before/after and its sites."""
        config = {**dataclasses.asdict(self.config), "compiler": self.config.compiler.value}
        graphs = [
            {
                "index": graph.index,
                "phase": graph.phase,
                "code_before": graph.code_before,
                "code_after": graph.code_after,
                "sites": [dataclasses.asdict(site) for site in graph.sites],
                "step_graph": graph.step_graph,
            }
            for graph in self.graphs
        ]
        return {"version": REPORT_VERSION, "config": config, "graphs": graphs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_dict`` output (e.g. after ``json.loads``)."""
        if data.get("version") != REPORT_VERSION:
            found = data.get("version")
            raise ValueError(f"report version {found!r}: this kivi-compile reads version {REPORT_VERSION}")
        graphs = tuple(
            GraphReport(
                graph["index"], graph["code_before"], graph["code_after"],
                tuple(SiteReport(**site) for site in graph["sites"]), graph.get("step_graph", ""),
            )  # fmt: skip
            for graph in data["graphs"]
        )
        return cls(KiviConfig(**data["config"]), graphs)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _kv_source(site: SiteReport) -> str:
    if site.kv_source:
        return site.kv_source
    return "new cache" if site.phase == "prefill" and site.rewritten else "-"


def _paint(text: str, ansi: str, on: bool) -> str:
    return f"\033[{ansi}m{text}\033[0m" if on else text


def _paint_diff_line(line: str, on: bool) -> str:
    if line.startswith(("---", "+++")):
        return _paint(line, "1", on)
    if line.startswith("@@"):
        return _paint(line, "36", on)
    if line.startswith("+"):
        return _paint(line, "32", on)
    if line.startswith("-"):
        return _paint(line, "31", on)
    return line


def _readable(code: str) -> list[str]:
    """Graph code as lines, leading blank lines dropped and the ``forward`` signature one input per line."""
    lines = code.lstrip("\n").splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*def forward\()(.*)(\):.*)$", line)
        if found:
            params = [p.strip() for p in found.group(2).split(",")]
            lines[i : i + 1] = [found.group(1), *(f"    {p}," for p in params), found.group(3)]
            break
    return lines
