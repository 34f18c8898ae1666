from pneumoscan.progress import progress_bar


def test_a_disabled_bar_writes_nothing(capsys) -> None:
    bar = progress_bar(False, 3, "epoch 1/1")
    for _ in range(3):
        bar.advance()
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_an_enabled_bar_counts_its_steps() -> None:
    bar = progress_bar(True, 3, "epoch 1/1")
    bar.advance()
    bar.advance()
    assert bar._progress.tasks[0].completed == 2
    bar.close()
