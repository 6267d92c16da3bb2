"""The documentation stays true: links resolve, the README's set-up commands are the ones CI runs,
no page states a test count or a suite time by hand, the README stays a landing page, and its
summary tables copy the numbers of the pages they link."""
from __future__ import annotations

import pathlib
import re
import shlex

from helpers import ROOT

README = ROOT / "README.md"
MAX_README_LINES = 300
# Every Markdown file a reader is sent to: the README, docs/ (results included), the guides of
# launch/ and colabs/.
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md"), ROOT / "launch" / "README.md",
               ROOT / "colabs" / "README.md"])

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
  """``text`` without fenced code blocks (links there are code, not links); inline code spans
  become a placeholder so that a link whose text is code still parses."""
  return _INLINE_CODE.sub("x", _FENCE.sub("", text))


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: the rendered text (code marks and link targets dropped),
  lower case, punctuation other than '-' and '_' removed, spaces as '-'."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
  text = re.sub(r"[^\w\- ]", "", text.strip().lower())
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
  seen: dict[str, int] = {}
  out = set()
  for _, heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
    base = slug(heading)
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def broken_links(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  """Every relative link of ``path`` whose file (or folder) is missing, or whose #anchor names
  no heading of its Markdown target (named relative to ``root``)."""
  bad = []
  for target in _LINK.findall(_prose(path.read_text())):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
      bad.append(f"{path.relative_to(root)}: {target} (no such file)")
    elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
      bad.append(f"{path.relative_to(root)}: {target} (no heading #{anchor})")
  return bad


def test_every_relative_link_and_anchor_resolves():
  assert len(DOCS) > 10 and (ROOT / "docs" / "results" / "README.md") in DOCS
  bad = [b for path in DOCS for b in broken_links(path)]
  assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_check_fails_on_a_broken_link(tmp_path):
  (tmp_path / "there.md").write_text("# A heading, with `code`\n\ntext\n")
  page = tmp_path / "page.md"
  page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://x.org/y)\n"
                  "```\n[in code](missing_in_code.md)\n```\n"
                  "[`gone`](gone.md) [bad anchor](there.md#nowhere)\n[self](#nothing-here)\n")
  assert broken_links(page, tmp_path) == ["page.md: gone.md (no such file)",
                                "page.md: there.md#nowhere (no heading #nowhere)",
                                "page.md: #nothing-here (no heading #nothing-here)"]


def test_slugs_follow_github():
  assert slug("CPU budget: pretrained vs random initialisation") == \
      "cpu-budget-pretrained-vs-random-initialisation"
  assert slug("PCAE's compute at the ImageNet settings") == "pcaes-compute-at-the-imagenet-settings"
  assert slug("TinyMIM: a ViT-T distilled from an MAE ViT-S") == \
      "tinymim-a-vit-t-distilled-from-an-mae-vit-s"
  assert slug("Out: `--to=timm`") == "out---totimm"


def _setup_commands() -> list[str]:
  """The code block under the README's "Set up and run" heading, line by line."""
  text = README.read_text()
  found = re.search(r"^## Set up and run.*?\n```\n(.*?)```", text, re.M | re.S)
  assert found, "README.md: no code block under '## Set up and run'"
  return found.group(1).strip().splitlines()


def _ci_lines() -> dict[str, str]:
  lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
  pip = [line for line in lines if line.startswith("pip install")]
  pytest_ = [line for line in lines if line.startswith("python -m pytest")]
  assert len(pip) == 1 and len(pytest_) == 1, ".ci/run: expected one pip and one pytest line"
  return {"pip": pip[0], "pytest": pytest_[0]}


def _without_quiet(command: str) -> list[str]:
  return [t for t in shlex.split(command) if t != "-q"]


def test_readme_test_command_is_what_ci_runs():
  first, second = _setup_commands()   # exactly two set-up lines
  ci = _ci_lines()
  install, run = second.split(" && ")
  assert run == ci["pytest"]
  # .ci/run installs quietly (-q); otherwise the same install.
  assert _without_quiet(install) == _without_quiet(ci["pip"])


def test_readme_first_command_trains_a_config_the_cli_tests_run():
  first, _ = _setup_commands()
  install, run = first.split(" && ")
  # The package alone: the CI install without its test extras.
  assert shlex.split(install) == [t.replace(".[test]", ".") for t in _without_quiet(_ci_lines()["pip"])]
  args = shlex.split(run)
  assert args[:3] == ["python", "-m", "mim_jax.main"]
  config = next(a for a in args if a.startswith("--config="))
  path = config.split("=", 1)[1].split(":", 1)[0]
  assert (ROOT / path).is_file(), f"README's first command names {path}, which does not exist"
  # The config's docstring gives the same command, and the CLI tests run that config.
  assert run in (ROOT / path).read_text()
  assert config in (ROOT / "tests" / "test_cli.py").read_text()


# A test count or a suite time written by hand goes stale with the next test.
_STATED_BY_HAND = [re.compile(p, re.I) for p in (
    r"\b\d[\d,]*\s+(?:unit\s+)?tests?\b(?!\.py)",
    r"\btests?\s+in\s+\d+(?:\.\d+)?\s*(?:min|s\b|sec|minutes|seconds|h\b|hours)",
    r"\b\d[\d,]*\s+(?:passed|failed|skipped)\b",
    r"\bsuite\b[^.\n]{0,30}\b\d+(?:\.\d+)?\s*(?:min|minutes|s\b|seconds)",
)]


def stated_by_hand(text: str) -> list[str]:
  return [m.group(0) for p in _STATED_BY_HAND for m in p.finditer(text)]


def test_no_document_states_a_test_count_or_suite_time():
  found = {str(p.relative_to(ROOT)): stated_by_hand(p.read_text()) for p in DOCS}
  assert not {k: v for k, v in found.items() if v}
  assert {"481 tests", "tests in 11 min"} <= set(stated_by_hand("481 tests in 11 min 49 s"))
  assert stated_by_hand("== 12 passed, 1 skipped in 3.2s ==") == ["12 passed", "1 skipped"]
  assert stated_by_hand("the suite takes 12 min on 2 cores") == ["suite takes 12 min"]
  assert not stated_by_hand("tests/test_fast_path.py, a test run beside it, 5 seeds, 3 steps")


def test_readme_is_a_landing_page():
  lines = README.read_text().splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail to docs/"


def _table_rows(text: str, heading: str) -> list[list[str]]:
  """The body rows of the first table under ``## heading``, as cells."""
  section = re.search(rf"^## {re.escape(heading)}.*?\n(.*?)(?=^## |\Z)", text, re.M | re.S)
  assert section, f"README.md: no '## {heading}' section"
  rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
  return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*\.\d+(?![\w.])|(?<![\w.])\d{1,3}(?:,\d{3})+(?![\w.])")


def test_readme_results_at_a_glance_copies_its_pages():
  """Every number in a row of the results summary is in the page that row links."""
  rows = _table_rows(README.read_text(), "Results at a glance")
  assert len(rows) >= 15
  for row in rows:
    link = re.search(r"\]\(([^)#]+)", row[-1])
    assert link, f"results row without a link to its table: {row}"
    page = (README.parent / link.group(1)).read_text()
    for cell in row[2:-1]:
      for number in _NUMBER.findall(cell):
        assert number in page, f"{row[0]}: {number} is not in {link.group(1)}"


def test_readme_speed_table_copies_docs_speed():
  rows = _table_rows(README.read_text(), "Speed")
  assert rows
  page = (ROOT / "docs" / "speed.md").read_text()
  for row in rows:
    for cell in row:
      for number in _NUMBER.findall(cell.replace("**", "")):
        assert number in page, f"speed row {row[:3]}: {number} is not in docs/speed.md"


def test_table_notes_are_a_line_or_two():
  """Notes under the generated tables ('[n] ...') state a protocol briefly; diagnostics stay in
  eval_results.json (mim_jax.report)."""
  long = [f"{path.relative_to(ROOT)}: {line[:60]}..." for path in DOCS
          for line in path.read_text().splitlines()
          if re.match(r"^\[\d+\] ", line) and len(line) > 300]
  assert not long, "notes over 300 characters:\n" + "\n".join(long)
