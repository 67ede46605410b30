"""Compiling the LaTeX notes of every built-in example, in both languages, and reading the logs.

Each document is compiled once per session (a module-scoped fixture, two at a time) with the TeX
installed on the machine; CI installs TeX Live (see .ci/run), so these run there. Without TeX
the tests skip with the packages to install.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from derive.cli import derivation_of
from derive.latex import (
    Compiled,
    compile_pdf,
    log_problems,
    missing_tex_message,
    render_latex,
    tex_available,
)
from derive.spec import list_examples, load_spec

EXAMPLES = [name for name, _ in list_examples()]
DOCUMENTS = [(name, lang) for name in EXAMPLES for lang in ("en", "zh")]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], Compiled]:
    for lang in ("en", "zh"):
        if not tex_available(lang):
            pytest.skip(missing_tex_message(lang))

    def build(document: tuple[str, str]) -> Compiled:
        name, lang = document
        return compile_pdf(render_latex(derivation_of(load_spec(name)), lang), lang,
                           jobname=name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(DOCUMENTS, pool.map(build, DOCUMENTS)))


@pytest.mark.parametrize("document", DOCUMENTS, ids=[f"{n}-{l}" for n, l in DOCUMENTS])
def test_compiles_cleanly(compiled, document):
    result = compiled[document]
    assert result.pdf.startswith(b"%PDF")
    # no errors, no undefined references, no overfull box wider than 10pt
    assert log_problems(result.log) == []
    assert "Output written" in result.log


def test_chinese_pdf_has_cjk_text(compiled, tmp_path):
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = tmp_path / "xor.zh.pdf"
    pdf.write_bytes(compiled["xor", "zh"].pdf)
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "反向传播" in text and "链式法则" in text


def test_pdf_page_one_renders(compiled, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    pdf = tmp_path / "xor.pdf"
    pdf.write_bytes(compiled["xor", "en"].pdf)
    subprocess.run(["pdftoppm", "-r", "40", "-png", "-f", "1", "-l", "1", str(pdf),
                    str(tmp_path / "page")], check=True)
    assert list(tmp_path.glob("page*.png"))
