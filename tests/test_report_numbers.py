"""inspect's numbers say what they count: one value where a range has equal ends, which fp32
total a ratio is against, and what the bytes on disk are."""

from __future__ import annotations

from pathlib import Path

from dmruntime import Bundle

from dmcompile.budget import span
from dmcompile.inspect import bundle_report, format_report

FIXTURES = Path(__file__).resolve().parents[1] / "runtimes" / "python" / "tests" / "data"


def test_span_prints_one_value_when_the_ends_agree():
    assert span([16.0, 16.0], ".1f") == "16.0"
    assert span([4.9921, 4.9919], ".3f") == "4.992"
    assert span([4.0, 5.25], ".2f") == "4.00-5.25"


def test_report_breaks_the_size_down_and_names_its_totals():
    r = bundle_report(Bundle.open(FIXTURES / "tiny-w8a8"), fusion=False)
    parts = r["size_parts"]
    assert sum(parts.values()) == r["total_bytes"]
    assert parts["engines"] > 0 and any(k.startswith("group inputs (2 files") for k in parts)
    text = format_report(r)
    assert "x the whole model's fp32 weights" in text
    assert "Conv/Gemm/MatMul layers on disk" in text and "norms, biases and embeddings not counted" in text
    bops = next(line for line in text.splitlines() if line.startswith("BOPs per sample"))
    lo_hi = bops.split("= ")[1].split("x fewer")[0]
    assert "-" not in lo_hi or lo_hi.split("-")[0] != lo_hi.split("-")[1]
