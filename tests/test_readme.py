"""The README's library example runs as written."""

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
