"""Stage 4, rendering: what people read and run, printed from the derivation.

- :mod:`derive.render.codegen`: the NumPy training module (``render_module``), with the
  NumPy printer (:mod:`~derive.render.numpy_printer`) and the named stability rewrites
  (:mod:`~derive.render.stability`);
- :mod:`derive.render.latex`: lecture notes in LaTeX and Markdown, English and Chinese
  (``render_latex``, ``render_markdown``), with the LaTeX printer and the worked example;
- :mod:`derive.render.pretty`: the terminal printer;
- :mod:`derive.render.regen`: ``generated/``, the committed outputs of the built-in examples.

Renderers never recompute math: they read :class:`derive.derivation.Derivation`.
"""
