"""The README's library example runs as written; the scripts and configs the docs name exist."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    samples, previews = namespace["samples"], namespace["previews"]
    assert samples.shape == (4, 32, 32, 3)
    assert [p.shape for p in previews] == [(4, 16, 16, 3), (4, 32, 32, 3)]
    assert "(4, 32, 32, 3)" in capsys.readouterr().out


def test_every_script_and_config_the_docs_name_exists():
    """The Makefile, README and docs name scripts and configs by path; a rename must
    update them (``make study`` once still called a renamed script)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    texts = [root / "Makefile", root / "README.md", *sorted((root / "docs").glob("*.md"))]
    pattern = re.compile(r"\b((?:experiments|configs|launch)/[\w./-]+\.(?:py|sh))")
    named = {(m, t.name) for t in texts for m in pattern.findall(t.read_text())}
    assert len(named) > 10  # the pattern finds them
    missing = sorted((path, where) for path, where in named if not (root / path).is_file())
    assert not missing, f"named but absent: {missing}"
