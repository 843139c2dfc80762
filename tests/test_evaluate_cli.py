"""`capvqa evaluate` on the bundled sample's official files."""

import json
import subprocess
import sys

from capvqa.resources import sample_dir


def evaluate(*args):
    return subprocess.run([sys.executable, "-m", "capvqa", "evaluate", *args], capture_output=True, text=True,
                          timeout=120)


def test_perfect_predictions_score_per_official_rules(tmp_path):
    annotations = json.loads((sample_dir() / "annotations.json").read_text())["annotations"]
    predictions = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in annotations]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(predictions))
    out = tmp_path / "m.json"
    done = evaluate("--questions", str(sample_dir() / "questions.json"), "--annotations",
                    str(sample_dir() / "annotations.json"), "--predictions", str(path), "--json", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"overall", "per_answer_type", "per_question_type", "per_question", "num_questions",
                            "missing"}
    assert metrics["num_questions"] == len(annotations) and metrics["missing"] == []
    assert set(metrics["per_answer_type"]) == {"yes/no", "number", "other"}
    assert 80 < metrics["overall"] <= 100
    assert "overall" in done.stdout


def test_subset_missing_and_unknown_ids(tmp_path):
    annotations = json.loads((sample_dir() / "annotations.json").read_text())["annotations"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question_id": annotations[0]["question_id"], "answer": "x"}]))
    out = tmp_path / "m.json"
    done = evaluate("--dataset", "sample", "--predictions", str(path), "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())["missing"]) == len(annotations) - 1
    done = evaluate("--dataset", "sample", "--predictions", str(path), "--only-predicted", "--json", str(out))
    assert json.loads(out.read_text())["num_questions"] == 1

    path.write_text(json.dumps([{"question_id": 987654321, "answer": "x"}]))
    done = evaluate("--dataset", "sample", "--predictions", str(path))
    assert done.returncode == 2 and "987654321" in done.stderr and "Traceback" not in done.stderr


def test_malformed_predictions_name_file_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"question_id": 1, "answer": "x"},\n {oops}]')
    done = evaluate("--dataset", "sample", "--predictions", str(path))
    assert done.returncode == 2 and "bad.json" in done.stderr and "2:" in done.stderr
