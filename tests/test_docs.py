"""The project documents itself: no pointer to files outside the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_tracked_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (a packaged copy): nothing to check against
        return
    offenders = [f for f in files if f.endswith((".py", ".md", ".yaml", ".txt", "Makefile"))
                 and any(ref in (ROOT / f).read_text(errors="replace") for ref in ("shared/DESIGN", "shared/seed", "DESIGN §"))
                 and f != "tests/test_docs.py"]
    assert not offenders, offenders


def test_every_algorithms_section_cited_in_the_code_exists():
    text = (ROOT / "docs/algorithms.md").read_text()
    sections = {line.split()[1].rstrip(".") for line in text.splitlines() if line.startswith("## ")}
    cited = {number for path in [*ROOT.glob("pipeline/**/*.py"), ROOT / "README.md", ROOT / "params.yaml"]
             for number in re.findall(r"algorithms §(\d+)", path.read_text())}
    assert cited and cited <= sections, cited - sections
