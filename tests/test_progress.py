"""Long loops say where they are: a bar on a terminal, one line per step in a log."""
from pipeline.progress import Progress


def test_one_line_per_step_without_a_terminal(capsys):
    bar = Progress(1, 4, "baseline", "epoch", terminal=False)
    for _ in bar:
        bar.report(val="0.100")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["baseline: epoch 2/4 val 0.100", "baseline: epoch 3/4 val 0.100", "baseline: epoch 4/4 val 0.100"]


def test_a_terminal_gets_the_bar_not_lines(capsys):
    bar = Progress(0, 2, "drmad -4", "meta-iteration", terminal=True)
    for _ in bar:
        bar.report(test="0.050")
    err = capsys.readouterr().err
    assert "drmad -4" in err and "test=0.050" in err and "meta-iteration 1/2" not in err
