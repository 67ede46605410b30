"""``derive latex``, and the default run's notes step."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from derive.cli.main import Echo
from derive.derivation import Derivation
from derive.errors import DeriveError
from derive.files import MARKER, check_target, write_generated
from derive.progress import Progress
from derive.render.latex import (
    compile_pdf,
    missing_tex_message,
    render_latex,
    render_markdown,
    tex_available,
)
from derive.render.latex_text import LANGUAGES

# --- the command line ----------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    """Add ``derive latex`` to the command line."""
    parser = commands.add_parser(
        "latex",  # its line in `derive --help`: derive.cli.main.EXTENSIONS
        description="Write the step-by-step derivation of backpropagation for a network as a "
                    "complete LaTeX article (diagram, notation, derivation, matrix and batch "
                    "forms, summary, worked numeric example), an equations-only fragment, "
                    "Markdown, or a compiled PDF. Without -o the text goes to stdout.",
        epilog="examples:\n  derive latex xor -o xor.tex\n"
               "  derive latex net.yaml --fragment -o d.tex\n"
               "  derive latex net.yaml --pdf -o net.pdf\n"
               "  derive latex net.yaml --lang zh --pdf\n"
               "  derive latex xor --format markdown -o xor.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC",
                        help="a spec file (.yaml, .yml, .json) or a built-in example name")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="output file (default: stdout; with --pdf, NAME.pdf)")
    parser.add_argument("--fragment", action="store_true",
                        help="equations only, to \\input into slides or notes")
    parser.add_argument("--pdf", action="store_true",
                        help="compile with the TeX installed here (latexmk, else "
                             "pdflatex/xelatex); with -o FILE.tex also keeps the .tex")
    parser.add_argument("--lang", choices=LANGUAGES, default="en",
                        help="language of the prose (default en; zh compiles with xelatex)")
    parser.add_argument("--format", choices=("latex", "markdown"), default="latex",
                        help="latex (default) or markdown with $$ math")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an output file that derive did not generate")
    parser.set_defaults(handler=_cmd_latex)


def _derivation(source: str, progress: Progress) -> Derivation:
    from derive.derivation.reverse import derive
    from derive.graph.model import build_model
    from derive.spec.load import load_spec

    return derive(build_model(load_spec(source)), progress)


def _cmd_latex(args: argparse.Namespace, echo: Echo) -> int:
    if args.format == "markdown" and (args.pdf or args.fragment):
        raise DeriveError("--format markdown writes one Markdown file; drop --pdf/--fragment")
    if args.pdf and args.fragment:
        raise DeriveError("--pdf compiles a complete document; drop --fragment")
    if args.pdf and not tex_available(args.lang):
        raise DeriveError(missing_tex_message(args.lang))
    if args.output:     # refused before the work, not after it
        check_target(args.output, force=args.force)
    with Progress() as progress:
        derivation = _derivation(args.spec, progress)
        if args.format == "markdown":
            text = render_markdown(derivation, args.lang, progress=progress)
        else:
            text = render_latex(derivation, args.lang, fragment=args.fragment,
                                progress=progress)
    if not args.pdf:
        if args.output:
            path = write_generated(args.output, text, force=args.force)
            echo(f"wrote {path}")
        else:
            echo(text.rstrip("\n"))
        return 0
    name = derivation.model.spec.name + ("" if args.lang == "en" else f".{args.lang}")
    target = Path(args.output or f"{name}.pdf")
    if target.suffix.lower() != ".pdf":
        write_generated(target, text, force=args.force)
        echo(f"wrote {target}")
        target = target.with_suffix(".pdf")
    write_pdf(text, target, args.lang, echo, force=args.force)
    return 0


def _pdf_is_ours(path: Path) -> bool:
    """Whether a PDF was made by derive: its Creator (read with pdfinfo) names the marker."""
    if MARKER.encode() in path.read_bytes():
        return True
    if shutil.which("pdfinfo") is None:
        return False
    result = subprocess.run(["pdfinfo", str(path)], check=False, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    return MARKER in result.stdout


def write_pdf(tex: str, target: Path, lang: str, echo: Echo, *, force: bool = False) -> None:
    """Compile ``tex`` and write the PDF to ``target`` (refusing a PDF derive did not make)."""
    if target.exists() and not force and not _pdf_is_ours(target):
        raise DeriveError(f"refusing to overwrite {str(target)!r}: it was not generated by "
                          "derive (use --force to overwrite it)")
    compiled = compile_pdf(tex, lang, jobname=target.stem)
    write_generated(target, compiled.pdf, force=True)
    echo(f"wrote {target} ({compiled.tool}, {compiled.seconds:.1f} s)")


def pipeline_step(derivation: Derivation, out_dir: Path, echo: Echo) -> None:
    """The default pipeline's LaTeX step: NAME.tex, and NAME.pdf when TeX is installed."""
    name = derivation.model.spec.name
    text = render_latex(derivation)
    path = write_generated(out_dir / f"{name}.tex", text)
    echo(f"LaTeX notes: {path}")
    if not tex_available("en"):
        echo(f"  (no PDF: {missing_tex_message('en')})")
        return
    try:
        write_pdf(text, out_dir / f"{name}.pdf", "en", lambda line: echo(f"  {line}"))
    except DeriveError as err:
        echo(f"  (no PDF: {err})")
