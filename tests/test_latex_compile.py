"""Compiling the LaTeX notes with TeX, in both languages, and reading the logs.

Every document must compile without errors, undefined references, missing glyphs or overfull
boxes wider than 10pt. Covered: every built-in example (the convolutional networks tiny_cnn,
digits_cnn and lenet among them), the graphs of test_latex_graphs (residual connections, layer
norm, dropout, penalties), a CNN with strides per axis, padding and average pooling
(test_latex_images), and every activation of the registry in a hidden and in the output layer
with every loss of the registry.

TeX is slow to start, the Chinese engine most of all, so the documents are compiled in few
runs: the xor notes, the residual graph and the hand-checkable CNN on their own (their PDFs are
inspected), every other
document of a language in one merged run: the preamble of the first, then the body of each
(the bodies are the renderer's text verbatim; labels carry the spec name, so they do not
clash). Runs go two at a time. Without TeX the tests skip with the packages to install; CI
installs TeX Live (see .ci/run), so they run there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from derive.cli.main import derivation_of, main
from derive.errors import DeriveError
from derive.registry.functions import ACTIVATIONS, LOSSES
from derive.render.latex import (
    Compiled,
    compile_pdf,
    log_problems,
    missing_tex_message,
    render_latex,
    tex_available,
)
from derive.spec.load import list_examples, load_spec
from tests.custom_op_specs import BILINEAR, HIGHWAY, PRODUCT, RBF
from tests.test_latex_graphs import SPECS
from tests.test_latex_images import CNNS, STRIDED

LANGUAGES = ("en", "zh")
ELEMENTWISE = [name for name in ACTIVATIONS if name != "softmax"]
STANDALONE = ("xor", "resnorm", "tiny_cnn")


def activation_specs() -> dict[str, dict]:
    """One small network per activation of the registry as the output layer, its hidden
    layer another activation (so every elementwise one is hidden once), each with the next
    loss of the registry that the spec accepts for that output (so every loss is used)."""
    losses = list(LOSSES)
    specs = {}
    for n, output in enumerate(ACTIVATIONS):
        hidden = ELEMENTWISE[n % len(ELEMENTWISE)]
        for shift in range(len(losses)):
            loss = losses[(n + shift) % len(losses)]
            spec = {"name": f"act_{output}", "input": 2, "loss": loss,
                    "layers": [{"size": 3, "activation": hidden},
                               {"size": 2, "activation": output}]}
            try:
                load_spec(spec)
            except DeriveError:
                continue
            specs[spec["name"]] = spec
            break
    return specs


def all_specs() -> dict[str, object]:
    specs: dict[str, object] = {name: name for name, _ in list_examples()}
    specs.update(SPECS)
    specs.update(activation_specs())
    # custom ops: contractions printed as einsum, a tensor parameter, placed sums
    specs.update({spec["name"]: spec for spec in (BILINEAR, HIGHWAY, RBF, PRODUCT)})
    specs[STRIDED["name"]] = STRIDED
    return specs


def test_the_convolutional_networks_are_compiled():
    assert set(CNNS) | {STRIDED["name"]} <= set(all_specs())


def merge(documents: dict[str, str]) -> tuple[str, list[tuple[int, str]]]:
    """One document with the preamble of the first and the body of each; and the line where
    each body starts, to name the document a problem is in."""
    preamble = None
    parts, starts = [], []
    line = 0
    for name, text in documents.items():
        head, _, rest = text.partition("\\begin{document}")
        preamble = preamble or head + "\\begin{document}\n"
        body = rest.rpartition("\\end{document}")[0]
        if not parts:
            line = preamble.count("\n")
        starts.append((line + 1, name))
        parts.append(body + "\n\\clearpage\n")
        line += parts[-1].count("\n")
    return preamble + "".join(parts) + "\\end{document}\n", starts


def _where(problem: str, starts: list[tuple[int, str]]) -> str:
    found = re.search(r"lines? (\d+)", problem) or re.search(r":(\d+):", problem)
    if not found:
        return problem
    number = int(found.group(1))
    name = [name for start, name in starts if start <= number][-1] if starts else "?"
    return f"{name}: {problem}"


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[Compiled, list]]:
    for lang in LANGUAGES:
        if not tex_available(lang):
            pytest.skip(missing_tex_message(lang))
    # SymPy work in this thread; the threads below only run TeX
    texts = {(name, lang): render_latex(derivation_of(load_spec(spec)), lang)
             for name, spec in all_specs().items() for lang in LANGUAGES}
    jobs: dict[str, tuple[str, str, list]] = {}
    for lang in LANGUAGES:
        merged, starts = merge({name: text for (name, text_lang), text in texts.items()
                                if text_lang == lang and name not in STANDALONE})
        jobs[f"merged-{lang}"] = (merged, lang, starts)
    for name in STANDALONE:
        for lang in LANGUAGES:
            jobs[f"{name}-{lang}"] = (texts[name, lang], lang, [])

    def build(key: str) -> tuple[Compiled, list]:
        text, lang, starts = jobs[key]
        try:
            return compile_pdf(text, lang, jobname=key.replace("-", "_")), starts
        except DeriveError as err:  # name the document the first error is in
            raise AssertionError(_where(str(err), starts)) from None

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(build, jobs)))


@pytest.mark.parametrize("job", [f"{kind}-{lang}" for kind in ("merged", *STANDALONE)
                                 for lang in LANGUAGES])
def test_compiles_cleanly(compiled, job):
    result, starts = compiled[job]
    assert result.pdf.startswith(b"%PDF")
    # no errors, no undefined references, no missing glyphs, no overfull box wider than 10pt
    assert [_where(problem, starts) for problem in _located(result.log)] == []
    assert "Output written" in result.log


def _located(log: str) -> list[str]:
    """log_problems, each with the whole log line it comes from (which says where)."""
    lines = log.splitlines()
    return [next((line for line in lines if line.startswith(problem)), problem)
            for problem in log_problems(log)]


def test_every_activation_and_loss_is_compiled():
    """The merged documents hold every activation as a hidden and as an output layer and
    every loss, in both languages (the registries, not a hand-picked list)."""
    specs = [load_spec(spec) for spec in all_specs().values()]
    hidden = {layer.activation.name for spec in specs for layer in spec.layers[:-1]
              if layer.activation is not None}
    output = {spec.layers[-1].activation.name for spec in specs
              if spec.layers[-1].activation is not None}
    assert set(ELEMENTWISE) <= hidden and set(ACTIVATIONS) <= output
    assert {spec.loss.name for spec in specs} >= set(LOSSES)


def test_chinese_pdf_has_cjk_text(compiled, tmp_path):
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = tmp_path / "xor.zh.pdf"
    pdf.write_bytes(compiled["xor-zh"][0].pdf)
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "反向传播" in text and "链式法则" in text
    graph = tmp_path / "resnorm.zh.pdf"
    graph.write_bytes(compiled["resnorm-zh"][0].pdf)
    text = subprocess.run(["pdftotext", str(graph), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "第 4 层" in text and "沿计算图反向传播" in text


def test_cnn_pdf_reads_its_derivation(compiled, tmp_path):
    """The hand-checkable CNN's notes, in both languages: the feature-map diagram's labels,
    the indicator of the first maximum and the words on the bracket reach the PDF."""
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    for lang, words in (("en", "only the windows that cover this entry"),
                        ("zh", "只有覆盖该元素的窗口")):
        pdf = tmp_path / f"tiny_cnn.{lang}.pdf"
        pdf.write_bytes(compiled[f"tiny_cnn-{lang}"][0].pdf)
        text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                              check=True).stdout
        assert "argmax" in text and "win" in text
        assert " ".join(words.split()) in " ".join(text.split())


def test_pdf_page_one_renders(compiled, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    for job in ("xor-en", "resnorm-en", "tiny_cnn-en"):
        pdf = tmp_path / f"{job}.pdf"
        pdf.write_bytes(compiled[job][0].pdf)
        subprocess.run(["pdftoppm", "-r", "40", "-png", "-f", "1", "-l", "1", str(pdf),
                        str(tmp_path / job)], check=True)
        assert list(tmp_path.glob(f"{job}*.png"))


def test_cli_pdf(tmp_path, capsys):
    if not tex_available("en"):
        pytest.skip(missing_tex_message("en"))
    target = tmp_path / "lnsoft.pdf"
    spec = tmp_path / "lnsoft.json"
    import json

    spec.write_text(json.dumps(SPECS["lnsoft"]), encoding="utf-8")
    assert main(["latex", str(spec), "--pdf", "-o", str(target)]) == 0
    assert target.read_bytes().startswith(b"%PDF")
    assert "wrote" in capsys.readouterr().out
