"""The resumable results file of verifier batch: rows survive, a row cut by a kill is dropped,
a foreign or damaged file is a clear error, error rows are rerun only on request."""
import pytest

from verifier.schedule import ResultsFile, SchedulerError
from verifier.schedule.results import HEADER

HEAD = ",".join(HEADER) + "\n"
ROW1 = "a.onnx,p.vnnlib,unsat,0.5000,crown,proved\n"
ROW2 = "b.onnx,p.vnnlib,error,0.1000,,RuntimeError: boom\n"


def test_new_file_gets_a_header_and_rows_are_on_disk_after_append(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ResultsFile("r.csv") as rf:
        assert rf.rows == [] and rf.done() == set()
        rf.append("x.onnx", "y.vnnlib", "sat", 1.25, "pgd", "found")
        # visible to another reader before close: flushed
        assert (tmp_path / "r.csv").read_text() == HEAD + "x.onnx,y.vnnlib,sat,1.2500,pgd,found\n"


def test_a_row_cut_by_a_kill_is_dropped_and_the_rest_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text(HEAD + ROW1 + "c.onnx,p.vnnlib,un")
    with ResultsFile("r.csv") as rf:
        assert [r["onnx"] for r in rf.rows] == ["a.onnx"]
        assert rf.done() == {(str(tmp_path / "a.onnx"), str(tmp_path / "p.vnnlib"))}
        rf.append("c.onnx", "p.vnnlib", "unsat", 2.0, "crown", "ok")
    assert (tmp_path / "r.csv").read_text() == HEAD + ROW1 + "c.onnx,p.vnnlib,unsat,2.0000,crown,ok\n"


def test_error_rows_stay_done_unless_retry_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text(HEAD + ROW1 + ROW2)
    with ResultsFile("r.csv") as rf:
        assert len(rf.done()) == 2
    assert (tmp_path / "r.csv").read_text() == HEAD + ROW1 + ROW2
    with ResultsFile("r.csv", retry_errors=True) as rf:
        assert rf.dropped_errors == 1 and len(rf.done()) == 1
    assert (tmp_path / "r.csv").read_text() == HEAD + ROW1


@pytest.mark.parametrize("text,needle", [
    ("benchmark,onnx,vnnlib,status\n", "not a results file of 'verifier batch'"),
    (HEAD + ROW1 + "a.onnx,p.vnnlib,maybe,1,x,y\n", "r.csv:3: not a result row"),
])
def test_a_foreign_or_damaged_file_is_a_clear_error(tmp_path, monkeypatch, text, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text(text)
    with pytest.raises(SchedulerError, match=needle):
        ResultsFile("r.csv")
    assert (tmp_path / "r.csv").read_text() == text  # left as it was
