"""lmms-eval integration: the `dove_llava` model, the shapes tasks, token accounting, bad samples, `eval-vqa`.

Everything runs lmms-eval itself (its CLI in a subprocess, `simple_evaluate` in process) on a tiny VLM built
here: a random dove-tiny tower whose EOS head is calibrated to read its inputs (so lengths vary with the
image and the query), a tiny LLaMA and a tokenizer trained on the shapes questions.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import statistics
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_vlm import SHORT_ANSWER_SUFFIX, make_shapes_dir, save_tiny_vlm

from dove_vlm.lmms_tasks import TASKS_DIR
from llava_adapter.inference import answer_questions

TASK = "dove_shapes_vqa"
LIMIT = 8
BATCH = 4


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return make_shapes_dir(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def test_records(shapes_dir):
    return json.loads((shapes_dir / "test" / "annotations.json").read_text())


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, shapes_dir):
    """A saved tiny VLM, loaded by every test through the same path a user's checkpoint takes."""
    return save_tiny_vlm(shapes_dir, tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture
def shapes_env(shapes_dir, monkeypatch):
    monkeypatch.setenv("DOVE_SHAPES_DIR", str(shapes_dir))
    return shapes_dir


def dove_llava(vlm_dir, **args):
    from llava_adapter.lmms_model import DoveLlava

    return DoveLlava(pretrained=str(vlm_dir), **{"batch_size": BATCH, **args})


@pytest.fixture(scope="module")
def task_manager():
    """Only this project's task folder: indexing lmms-eval's hundreds of built-in tasks takes seconds."""
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(model, task_manager, task=TASK, limit=LIMIT):
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=model, tasks=[task], limit=limit, log_samples=True, task_manager=task_manager, verbosity="WARNING"
    )


def visual_counts(samples):
    return [sample["token_counts"][0].get("visual_tokens") for sample in samples]


# ------------------------------------------------------------------------------------------ registration


def test_entry_point_registers_dove_llava():
    """`pip install` exposes dove_llava through lmms-eval's entry-point group; lmms-eval resolves it."""
    points = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert "dove_llava" in points, "dove-vlm's lmms_eval.models entry point is not installed (pip install -e .)"
    from lmms_eval.models import get_model

    from llava_adapter.lmms_model import DoveLlava

    assert get_model("dove_llava") is DoveLlava


# ------------------------------------------------------------------------------------ the CLI, end to end


def run_lmms_eval_cli(out: Path, model_args: str, shapes_dir: Path, limit: int) -> tuple[dict, list[dict]]:
    """`python -m lmms_eval` on the shapes task; its results and its samples log."""
    env = {**os.environ, "DOVE_SHAPES_DIR": str(shapes_dir)}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "dove_llava", "--model_args", model_args,
        "--include_path", str(TASKS_DIR), "--tasks", TASK, "--limit", str(limit),
        "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
    ]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results_file] = glob.glob(str(out / "*" / "*_results.json"))
    [samples_file] = glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))
    results = json.loads(Path(results_file).read_text())
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    return results, samples


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, vlm_dir, shapes_dir):
    model_args = f"pretrained={vlm_dir},query=true,budget=auto,batch_size={BATCH}"
    return run_lmms_eval_cli(tmp_path_factory.mktemp("cli"), model_args, shapes_dir, LIMIT)


@pytest.mark.slow
def test_cli_writes_accuracy_token_stats_and_per_sample_counts(cli_run):
    results, samples = cli_run
    metrics = results["results"][TASK]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    assert len(samples) == LIMIT
    counts = visual_counts(samples)
    assert all(isinstance(n, int) and 1 <= n <= 32 for n in counts), counts
    assert len(set(counts)) > 1, "the calibrated tower should spend different token counts on different samples"
    assert metrics["visual_tokens_mean,none"] == pytest.approx(statistics.fmean(counts))
    assert metrics["visual_tokens_median,none"] == pytest.approx(statistics.median(counts))
    assert metrics["visual_tokens_max,none"] == max(counts)
    assert metrics["exact_match,none"] == pytest.approx(statistics.fmean(s["exact_match"] for s in samples))
    assert results["throughput"]["avg_latency"] > 0  # seconds per answer, for answers/s


OVERFIT_STEPS = 200
OVERFIT = 4  # test records the tiny VLM learns by heart, the first ones `--limit` takes


@pytest.mark.slow
def test_cli_gives_full_credit_to_a_vlm_overfitted_on_the_records_it_answers(vlm_dir, shapes_dir, tmp_path):
    """The tiny VLM, fully fine-tuned on the first few test questions until it recites their answers, answers
    them right through lmms-eval's CLI: every sample's reply is its answer and exact_match is 1.0. The records
    have different answers, so no fixed reply could pass; 200 full fine-tuning steps at a constant 3e-3 take the
    loss from about 1.3 to about 0.002 (8 s on 2 cores)."""
    from llava_adapter.train import FinetuneArguments, finetune

    rows = pq.read_table(shapes_dir / "test" / "vqa.parquet").to_pylist()[:OVERFIT]
    by_id = {r["id"]: r for r in json.loads((shapes_dir / "test" / "llava.json").read_text())}
    train = tmp_path / "train.json"
    train.write_text(json.dumps([by_id[r["question_id"]] for r in rows]))
    assert len({r["answer"] for r in rows}) > 1  # more than one answer to learn: no single reply passes
    overfitted = tmp_path / "overfitted"
    result = finetune(FinetuneArguments(
        stage=2, model=str(vlm_dir), data=str(train), image_folder=str(shapes_dir / "images"),
        output_dir=str(overfitted), lora=False, max_steps=OVERFIT_STEPS, per_device_train_batch_size=OVERFIT,
        learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler_type="constant", group_by_visual_length=False,
        save_steps=None, logging_steps=OVERFIT_STEPS // 4,
    ))  # fmt: skip
    assert result.losses[-1] < 0.05, result.losses

    model_args = f"pretrained={overfitted},batch_size={BATCH}"
    results, samples = run_lmms_eval_cli(tmp_path / "cli", model_args, shapes_dir, OVERFIT)
    samples.sort(key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(OVERFIT))
    assert [s["target"] for s in samples] == [r["answer"] for r in rows]  # the records it was trained on
    assert [s["filtered_resps"] for s in samples] == [r["answer"] for r in rows]  # the CLI log keeps one string
    assert [s["exact_match"] for s in samples] == [1.0] * OVERFIT
    assert results["results"][TASK]["exact_match,none"] == 1.0


@pytest.mark.slow
def test_simple_evaluate_with_an_instance_matches_the_cli(cli_run, vlm_dir, shapes_env, task_manager):
    cli_results, cli_samples = cli_run
    results = evaluate(dove_llava(vlm_dir, query=True, budget="auto"), task_manager)
    for key in ("exact_match,none", "visual_tokens_mean,none", "visual_tokens_median,none", "visual_tokens_max,none"):
        assert results["results"][TASK][key] == cli_results["results"][TASK][key], key
    samples = results["samples"][TASK]
    # The samples file stores a one-request document's response unwrapped.
    assert [s["filtered_resps"][0] for s in samples] == [s["filtered_resps"] for s in cli_samples]
    assert [s["token_counts"] for s in samples] == [s["token_counts"] for s in cli_samples]


@pytest.mark.slow
def test_two_cpu_processes_score_every_request_once_and_keep_the_counts(cli_run, tmp_path, vlm_dir, shapes_dir):
    """torchrun, two CPU processes (gloo): each sample is answered by one process, none twice or lost, and its
    answer and token counts are those of the one-process run (an odd limit makes lmms-eval pad a rank)."""
    _, single = cli_run
    limit = LIMIT - 1
    env = {**os.environ, "DOVE_SHAPES_DIR": str(shapes_dir), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval",
        "--model", "dove_llava", "--model_args", f"pretrained={vlm_dir},query=true,budget=auto,batch_size={BATCH},device=cpu",
        "--include_path", str(TASKS_DIR), "--tasks", TASK, "--limit", str(limit),
        "--output_path", str(tmp_path), "--log_samples", "--verbosity", "WARNING",
    ]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [samples_file] = glob.glob(str(tmp_path / "*" / f"*_samples_{TASK}.jsonl"))
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(limit))
    expected = {s["doc_id"]: s for s in single[:limit]}
    for sample in samples:
        reference = expected[sample["doc_id"]]
        assert sample["filtered_resps"] == reference["filtered_resps"]
        assert sample["token_counts"] == reference["token_counts"]


# --------------------------------------------------------------------------------------- token accounting


@pytest.mark.slow
def test_query_on_and_off_record_different_token_counts(vlm_dir, shapes_env, task_manager, test_records):
    on = evaluate(dove_llava(vlm_dir, query=True), task_manager)
    off_model = dove_llava(vlm_dir, query=False)
    off = evaluate(off_model, task_manager)
    on_counts, off_counts = visual_counts(on["samples"][TASK]), visual_counts(off["samples"][TASK])
    assert on_counts != off_counts
    # Each count is the tower's own length for that image and the query that reached it (none when off).
    records = test_records[:LIMIT]
    tower = off_model.model.vision_tower
    pixels = tower.image_processor.to_tensor([shapes_env / "images" / f"{r['image_id']}.png" for r in records])
    queries = [r["question"] for r in records]  # the question alone, without the answer-format instruction
    with torch.no_grad():
        tower(pixels)
        assert off_counts == tower.last_lengths.tolist()
        tower(pixels, queries=queries)
        assert on_counts == tower.last_lengths.tolist()


def test_a_fixed_budget_records_exactly_that_many_tokens(vlm_dir, shapes_env, task_manager):
    results = evaluate(dove_llava(vlm_dir, query=True, budget=5), task_manager)
    assert visual_counts(results["samples"][TASK]) == [5] * LIMIT
    for stat in ("mean", "median", "max"):
        assert results["results"][TASK][f"visual_tokens_{stat},none"] == 5


@pytest.fixture
def chosen_mc_dir(shapes_dir, test_records, tmp_path, monkeypatch):
    """The shapes data with its test split cut to two questions picked on purpose: a yes/no question (two
    choices) and a colour question (six), so both kinds of choice list are scored whatever the seed draws."""
    table = pq.read_table(shapes_dir / "test" / "vqa.parquet")
    rows = table.to_pylist()
    picks = [next(r for r in rows if r["question_type"] in ("presence", "position")),
             next(r for r in rows if r["question_type"] == "colour")]  # fmt: skip
    out = tmp_path / "chosen"
    (out / "test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(picks, schema=table.schema), out / "test" / "vqa.parquet")
    (out / "images").symlink_to(shapes_dir / "images")
    monkeypatch.setenv("DOVE_SHAPES_DIR", str(out))
    return picks


def _answer_logprob(model, tokenizer, image, prompt: str, answer: str) -> float:
    """log p(answer | image, prompt) from one unpadded forward pass: the answer is the sequence's tail, so the
    logits one position before each of its tokens score it (no labels, padding or batching involved)."""
    from llava_adapter.conversation import tokenize_generation_prompt

    prompt_ids = tokenize_generation_prompt(prompt, tokenizer, model.config.conversation_template)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids + answer_ids])
    pixels = model.vision_tower.image_processor.to_tensor([image])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), images=pixels).logits[0]
    n = len(answer_ids)
    log_probs = torch.log_softmax(logits[-n - 1 : -1].double(), dim=-1)
    return float(log_probs.gather(-1, torch.tensor(answer_ids).unsqueeze(-1)).sum())


def test_multiple_choice_task_scores_choices_by_likelihood(vlm_dir, chosen_mc_dir, task_manager):
    from dove_vlm.lmms_tasks.dove_shapes_vqa.utils import doc_to_choice

    model = dove_llava(vlm_dir, query=False)
    results = evaluate(model, task_manager, task="dove_shapes_vqa_mc", limit=None)
    samples = results["samples"]["dove_shapes_vqa_mc"]
    assert [s["doc"]["question_id"] for s in samples] == [r["question_id"] for r in chosen_mc_dir]
    images = [Path(os.environ["DOVE_SHAPES_DIR"]) / "images" / f"{r['image_id']}.png" for r in chosen_mc_dir]
    for sample, record, image in zip(samples, chosen_mc_dir, images):
        choices = doc_to_choice(record)
        assert len(choices) == (2 if record["question_type"] in ("presence", "position") else 6)
        scores = [resp[0] for resp in sample["filtered_resps"]]
        assert len(scores) == len(choices)
        assert all(isinstance(c["visual_tokens"], int) for c in sample["token_counts"])
        # Each score is minus log p(choice | image, question), computed here one choice at a time.
        prompt = record["question"] + SHORT_ANSWER_SUFFIX
        expected = [-_answer_logprob(model.model, model.tokenizer, image, prompt, c) for c in choices]
        assert scores == pytest.approx(expected, rel=1e-4, abs=1e-4)
        # The task's pick is the likeliest choice by those scores, and it is credited iff it is the answer.
        likeliest = min(range(len(expected)), key=expected.__getitem__)
        assert sample["target"] == choices.index(record["answer"])
        assert sample["acc"] == float(likeliest == choices.index(record["answer"]))
    assert results["results"]["dove_shapes_vqa_mc"]["acc,none"] == pytest.approx(
        statistics.fmean(s["acc"] for s in samples)
    )


# -------------------------------------------------------------------------------------------- bad samples


@pytest.fixture
def broken_shapes_dir(shapes_dir, tmp_path, monkeypatch):
    """A copy of the shapes data whose first four test questions are each broken in one way."""
    out = tmp_path / "broken"
    (out / "test").mkdir(parents=True)
    table = pq.read_table(shapes_dir / "test" / "vqa.parquet")
    rows = table.to_pylist()
    rows[0]["image"] = {"bytes": b"this is not a png", "path": "garbage.png"}
    rows[1]["image"] = {"bytes": None, "path": str(tmp_path / "missing.png")}
    rows[2]["question"] = ""
    rows[3]["question"] = "Is the " + "very " * 700 + "red circle left of the blue square?"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "test" / "vqa.parquet")
    monkeypatch.setenv("DOVE_SHAPES_DIR", str(out))
    return out


def test_bad_samples_are_scored_wrong_with_their_error_and_nothing_else_is_lost(
    vlm_dir, broken_shapes_dir, task_manager
):
    results = evaluate(dove_llava(vlm_dir, query=True), task_manager)
    samples = results["samples"][TASK]
    assert len(samples) == LIMIT
    expected_errors = ["not an image", "not found", "empty question", "maximum length"]
    for sample, fragment in zip(samples[:4], expected_errors):
        error = sample["token_counts"][0]["error"]
        assert fragment in error, (fragment, error)
        assert sample["error"] == error
        assert sample["filtered_resps"] == [""] and sample["exact_match"] == 0.0
        assert sample["visual_tokens_mean"] is None
    good = samples[4:]
    assert all("error" not in s and "error" not in s["token_counts"][0] for s in good)
    counts = visual_counts(good)
    assert all(isinstance(n, int) and n >= 1 for n in counts)
    assert results["results"][TASK]["visual_tokens_mean,none"] == pytest.approx(statistics.fmean(counts))


# --------------------------------------------------------------------------------- the model class itself


def _instances(docs, gen_kwargs, task="probe"):
    from lmms_eval.api.instance import Instance

    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["prompt"], dict(gen_kwargs), lambda d: [d["image"]], index, task, "test"),
            idx=0,
            metadata={"task": task, "doc_id": index, "repeats": 1},
        )
        for index, doc in enumerate(docs)
    ]


@pytest.fixture
def probe_docs(shapes_dir, test_records):
    return [
        {"prompt": r["question"] + SHORT_ANSWER_SUFFIX,
         "image": Image.open(shapes_dir / "images" / f"{r['image_id']}.png").convert("RGB")}
        for r in test_records[:3]
    ]  # fmt: skip


def _texts(model, docs, gen_kwargs):
    model.task_dict = {"probe": {"test": docs}}
    return [r.text for r in model.generate_until(_instances(docs, gen_kwargs))]


def test_generate_until_batches_keep_order_and_respect_until_and_max_new_tokens(vlm_dir, probe_docs):
    batched = dove_llava(vlm_dir, query=False, batch_size=2)  # three requests: a batch of two and one alone
    single = dove_llava(vlm_dir, query=False, batch_size=1)
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    texts = _texts(batched, probe_docs, greedy)
    assert texts == _texts(single, probe_docs, greedy)
    # The task's generation kwargs reach generation: the same answers as the adapter's own call with them,
    # and a longer limit gives longer answers.
    direct = answer_questions(batched.model, batched.tokenizer, [d["image"] for d in probe_docs],
                              [d["prompt"] for d in probe_docs], use_query=False, max_new_tokens=4)  # fmt: skip
    assert texts == [a.text for a in direct]
    longer = _texts(batched, probe_docs, {**greedy, "max_new_tokens": 8})
    assert any(len(b) > len(a) for a, b in zip(texts, longer))
    # A stop sequence taken from inside an answer cuts that answer right before it.
    long_text = max(texts, key=len)
    stop = long_text[len(long_text) // 2 :][:2]
    cut = _texts(batched, probe_docs, {**greedy, "until": [stop]})
    assert cut != texts
    for full, short in zip(texts, cut):
        assert short == (full[: full.find(stop)] if stop in full else full)


def test_a_task_without_max_new_tokens_gets_lmms_evals_default_not_a_short_one(vlm_dir, probe_docs):
    from llava_adapter.lmms_model import DEFAULT_MAX_NEW_TOKENS

    model = dove_llava(vlm_dir, query=False, batch_size=1)
    model.task_dict = {"probe": {"test": probe_docs[:1]}}
    [result] = model.generate_until(_instances(probe_docs[:1], {"temperature": 0}))
    direct = answer_questions(model.model, model.tokenizer, [probe_docs[0]["image"]], [probe_docs[0]["prompt"]],
                              use_query=False, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)  # fmt: skip
    assert DEFAULT_MAX_NEW_TOKENS == 1024
    assert result.text == direct[0].text
    assert result.token_counts.output_tokens == direct[0].generated_tokens > 16


def test_request_loops_draw_a_progress_bar_on_the_first_process_only(vlm_dir, probe_docs, capsys):
    model = dove_llava(vlm_dir, query=False, batch_size=2)
    capsys.readouterr()
    _texts(model, probe_docs, {"max_new_tokens": 2})
    assert "dove_llava generate" in capsys.readouterr().err
    model._rank = 1  # as lmms-eval sets it on the other processes of a multi-process run
    _texts(model, probe_docs, {"max_new_tokens": 2})
    assert "dove_llava generate" not in capsys.readouterr().err


def test_clean_releases_the_weights_and_the_next_request_reloads_them(vlm_dir, probe_docs):
    model = dove_llava(vlm_dir)
    before = _texts(model, probe_docs[:2], {"max_new_tokens": 3})
    model.clean()
    assert model._model is None
    assert _texts(model, probe_docs[:2], {"max_new_tokens": 3}) == before


def test_the_tower_query_is_the_question_without_standard_instructions():
    from llava_adapter.conversation import conversation_query
    from llava_adapter.conversation import tower_query as question_of

    assert question_of("Is there a dog? Please answer yes or no." + SHORT_ANSWER_SUFFIX) == "Is there a dog?"
    assert question_of("What colour is the circle?" + SHORT_ANSWER_SUFFIX) == "What colour is the circle?"
    assert question_of("Describe the scene.") == "Describe the scene."
    assert question_of(SHORT_ANSWER_SUFFIX) == ""
    # Training derives the query by the same rule from a LLaVA conversation.
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?" + SHORT_ANSWER_SUFFIX},
        {"from": "gpt", "value": "red"},
    ]
    assert conversation_query(turns) == "What colour is the circle?"


def test_multi_round_requests_are_refused_clearly(vlm_dir):
    with pytest.raises(NotImplementedError, match="multi-round"):
        dove_llava(vlm_dir).generate_until_multi_round([])


@pytest.mark.parametrize(
    "args, message",
    [
        ({"query": "maybe"}, "query must be true or false"),
        ({"budget": 0}, "budget must be a positive integer"),
        ({"budget": 33}, "exceeds the tower's maximum of 32"),
        ({"threshold": 1.5}, "threshold must lie in"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"querry": True}, "unknown model arg"),
    ],
)
def test_bad_model_args_are_named(vlm_dir, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        dove_llava(vlm_dir, **args)


def test_model_args_from_the_command_line_win_over_cli_defaults(vlm_dir):
    from llava_adapter.lmms_model import DoveLlava

    model = DoveLlava.create_from_arg_string(
        f"pretrained={vlm_dir},query=false,budget=7,threshold=0.4,batch_size=3,max_new_tokens=5",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    assert (model.use_query, model.budget, model.threshold, model.batch_size, model.max_new_tokens) == (
        False, 7, 0.4, 3, 5,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ eval-vqa


@pytest.mark.slow
def test_eval_vqa_writes_table_plot_and_blind_baseline(vlm_dir, shapes_env, tmp_path):
    from dove_vlm.cli import main
    from dove_vlm.shapes import blind_baseline_accuracy

    out = tmp_path / "eval"
    code = main([
        "eval-vqa", "--model", str(vlm_dir), "--tasks", TASK, "--budgets", "auto,4", "--query", "both",
        "--limit", "6", "--batch-size", str(BATCH), "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    settings = {(r["query"], r["budget"]) for r in rows if r["setting"] != "blind"}
    assert settings == {("on", "auto"), ("on", "4"), ("off", "auto"), ("off", "4")}
    for row in rows:
        if row["setting"] == "blind":
            continue
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert float(row["answers_per_s"]) > 0
        if row["budget"] == "4":
            assert float(row["mean_visual_tokens"]) == 4.0
    [blind] = [r for r in rows if r["setting"] == "blind"]
    train = json.loads((shapes_env / "train" / "annotations.json").read_text())
    test = json.loads((shapes_env / "test" / "annotations.json").read_text())[:6]
    assert float(blind["accuracy"]) == pytest.approx(blind_baseline_accuracy(train, test))
    assert float(blind["mean_visual_tokens"]) == 0.0
    # Each row names the samples log it was computed from, inside its own setting's folder.
    for row in rows:
        if row["setting"] != "blind":
            log = out / row["samples_log"]
            assert log.is_file() and log.is_relative_to(out / "runs" / row["setting"])
            assert sum(1 for line in log.read_text().splitlines() if line.strip()) == int(row["n"])
    # Each row is the run it summarises: the results JSON of that setting holds the same accuracy.
    auto_on = next(r for r in rows if (r["query"], r["budget"]) == ("on", "auto"))
    [run_results] = glob.glob(str(out / "runs" / auto_on["setting"] / "*" / "*_results.json"))
    assert float(auto_on["accuracy"]) == pytest.approx(
        json.loads(Path(run_results).read_text())["results"][TASK]["exact_match,none"]
    )
    assert (out / "results.md").read_text().count("\n") >= 6
    with Image.open(out / "accuracy_vs_visual_tokens.png") as plot:
        assert plot.size[0] > 100 and plot.size[1] > 100


def test_an_empty_question_is_refused_by_chat_and_answer_questions_alike(vlm_dir, shapes_dir, test_records, capsys):
    """The lmms-eval model scores an empty question as an error (above); chat and the API follow the same rule."""
    from dove_vlm.cli import main
    from llava_adapter.conversation import require_question
    from llava_adapter.inference import load_pretrained_model

    image = str(shapes_dir / "images" / f"{test_records[0]['image_id']}.png")
    for question in ("", "   ", "<image>\n"):
        assert main(["chat", "--model", str(vlm_dir), "--image", image, "--question", question]) == 2
        assert "--question: empty question" in capsys.readouterr().err
    tokenizer, model, _, _ = load_pretrained_model(str(vlm_dir))
    with pytest.raises(ValueError, match=r"questions\[1\]: empty question"):
        answer_questions(model, tokenizer, [image, image], ["what colour is the circle?", " \n"])
    assert require_question("<image>\nwhat shape is it?" + SHORT_ANSWER_SUFFIX) == "what shape is it?"
    assert main(["chat", "--model", str(vlm_dir), "--image", image, "--question", "what shape is it?"]) == 0
    assert "visual tokens:" in capsys.readouterr().out
