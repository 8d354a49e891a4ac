"""The docs check (scripts/docs_check.py): which commands it extracts, in which order, and how it judges them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_check", REPO / "scripts" / "docs_check.py")
docs_check = importlib.util.module_from_spec(spec)
sys.modules["docs_check"] = docs_check  # dataclasses look their module up
spec.loader.exec_module(docs_check)

PAGE = '''# Demo

```bash
# a comment
kiln train a.yaml \\
    train.steps=5
cat > x.yaml <<'EOF'
train: {steps: 1}
EOF
kiln estimate big.yaml
# kiln: does not fit: 9.0 GiB per GPU (...)
```

```console
$ kiln data prepare stdlib --out d
prepared d: 3 documents
$ kiln train bad.yaml parallel.tp=3
kiln: config error: parallel.tp: not divisible
```

```python
print("not a command")
```

<!-- docs-check: skip needs a GPU -->
```bash
python bench/mfu.py
```
'''


def test_extracts_commands_expected_errors_and_skips(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("| page |\n|---|\n| [docs/b.md](docs/b.md) | b |\n| [docs/a.md](docs/a.md) | a |\n")
    (tmp_path / "docs" / "a.md").write_text(PAGE)
    (tmp_path / "docs" / "b.md").write_text("```sh\nkiln plan --flops 1e21\n```\n")
    (tmp_path / "docs" / "c.md").write_text("```bash\nkiln status runs/x\n```\n")
    assert docs_check.pages(tmp_path) == ["README.md", "docs/b.md", "docs/a.md", "docs/c.md"]
    cmds = docs_check.extract(tmp_path)
    texts = [c.text for c in cmds]
    assert texts == ["kiln plan --flops 1e21", "kiln train a.yaml \\\n    train.steps=5",
                     "cat > x.yaml <<'EOF'\ntrain: {steps: 1}\nEOF", "kiln estimate big.yaml",
                     "kiln data prepare stdlib --out d", "kiln train bad.yaml parallel.tp=3", "python bench/mfu.py",
                     "kiln status runs/x"]
    assert cmds[3].expect_error == "kiln: does not fit: 9.0 GiB per GPU (...)"
    assert cmds[5].expect_error == "kiln: config error: parallel.tp: not divisible"
    assert [c.skip for c in cmds].count(None) == 7 and cmds[6].skip == "needs a GPU"
    assert docs_check._matches(cmds[3].expect_error, "kiln: does not fit: 9.0 GiB per GPU (weights 3 GiB)")
    assert not docs_check._matches(cmds[3].expect_error, "kiln: does not fit: 12.5 GiB per GPU (weights 3 GiB)")


def test_runs_in_one_shell_and_judges_exit_codes(tmp_path):
    cmds = [docs_check.Command("p", 1, "export DEMO=42 && pip install nothing"),
            docs_check.Command("p", 2, 'test "$DEMO" = 42 && python -m pytest -q'),
            docs_check.Command("p", 3, "echo 'kiln: no such thing (x)' >&2; exit 2", expect_error="kiln: no such thing (...)"),
            docs_check.Command("p", 4, "false"),
            docs_check.Command("p", 5, "rm -rf /", skip="illustrative")]
    docs_check.run(cmds, tmp_path, {"PATH": "/usr/bin:/bin"}, timeout=60)
    assert [c.status for c in cmds] == ["ok", "ok", "ok", "FAILED", "skipped"]


def test_the_repository_docs_extract_and_every_page_is_reached():
    cmds = docs_check.extract(REPO)
    pages = docs_check.pages(REPO)
    assert pages[0] == "README.md" and set(pages[1:]) == {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    assert len(cmds) > 30
    skipped = [c for c in cmds if c.skip]
    # illustrative-only blocks stay few: a template, a real GPU cluster, a benchmark, hours of CPU, your own runs
    blocks = {(c.page, c.skip) for c in skipped}
    assert len(blocks) <= 8, sorted(blocks)
