"""derive.progress: the one-line indicator, and the stages that report to it."""

from __future__ import annotations

import io

from derive.derivation.reverse import derive
from derive.graph.model import build_model
from derive.progress import Progress
from derive.render.latex import render_latex
from derive.spec.load import load_spec
from tests.conftest import make_spec


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_line_redrawn_in_place_then_cleared():
    stream = Terminal()
    with Progress(stream, after=0.0, every=0.0) as progress:
        progress("deriving", 1, 3)
        progress("deriving", 3, 3)
    text = stream.getvalue()
    assert "\n" not in text
    assert text.startswith("\rderive: deriving 1/3 (") and "\rderive: deriving 3/3 (" in text
    assert text.endswith("\r") and text.rstrip("\r").endswith(" ")  # the line is blanked


def test_quiet_for_short_work_and_off_a_terminal():
    short = Terminal()
    with Progress(short, after=60.0) as progress:
        progress("deriving", 1, 2)
    piped = io.StringIO()
    with Progress(piped, after=0.0) as progress:
        progress("deriving", 1, 2)
    assert short.getvalue() == "" and piped.getvalue() == ""


def test_derivation_and_document_report_as_they_go():
    seen: list[tuple[str, int, int]] = []
    derivation = derive(build_model(make_spec([2, 3, 3, 1], ["tanh", "relu", "sigmoid"])),
                        lambda *report: seen.append(report))
    assert [done for what, done, total in seen if what == "deriving"] == [0, 1, 2]
    seen.clear()
    render_latex(derivation, progress=lambda *report: seen.append(report))
    counts = {what for what, _done, total in seen if total == len(derivation.formulas)}
    assert counts == {"writing the summary", "writing the tensor forms"}
    seen.clear()
    render_latex(derive(build_model(load_spec("xor"))), fragment=True,
                 progress=lambda *report: seen.append(report))
    assert {what for what, _done, _total in seen} == {"writing the summary",
                                                      "writing the batch forms"}
