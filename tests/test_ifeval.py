"""IF-Eval (OOD metric): the instruction checkers on replies that pass and fail, the JSONL loader's
errors, the fixture's coverage, the lm-eval route's guard and call, and one run through a real
RolloutGroup on the tiny model whose accuracy is recomputed from its replies."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from oel_ray.ifeval import (IFEvalRow, check_response, load_rows, prompt_seeds, reference_sampling,
                            run_ifeval, score, select_rows)
from oel_ray.ifeval_checks import SUPPORTED, count_sentences, follows
from oel_ray.types import Sampling

# ----------------------------------------------------------------------------- checkers

LOW40 = {"num_words": 40, "relation": "less than"}
# (instruction id, kwargs, a reply that follows it, a reply that does not): each failing reply is a
# near miss, so a checker that is too lenient or off by one at the threshold fails here.
CASES = [
    ("keywords:existence", {"keywords": ["bridge", "River"]}, "The BRIDGE spans the river.", "The bridge spans it."),
    ("keywords:frequency", {"keyword": "green", "frequency": 3, "relation": "at least"},
     "Green moss, green leaves, evergreen pines.", "Green moss and green leaves."),
    ("keywords:frequency", {"keyword": "very", "frequency": 2, "relation": "less than"},
     "It is very good.", "Very, very good."),
    ("keywords:forbidden_words", {"forbidden_words": ["sweet", "sugar"]},
     "Juicy and sweetish? No: tangy.", "Rich and Sweet."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "A zoo visit.", "Zebras at the zoo."),
    ("length_constraints:number_words", LOW40, " ".join(["word"] * 39), " ".join(["word"] * 40)),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five",
     "one two three-four"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith came at 3.5 p.m. today. He left!", "One. Two? Three!"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     'She said "go." Then she left', "Just one sentence, e.g. this one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a\n***\nb\n***\nc\n***", "a\n***\n\n***\nb"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"},
     "Wipe the counters.\n\n\"Finally, mop the floor.", "Wipe the counters.\n\nThen, finally, mop."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "On [date] at [place].", "On [date] soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks!\n\np.s. see you", "Thanks! PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi\nP.P.S more", "Hi\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n- c", "* a\n* b\n**bold** c"),
    ("detectable_format:constrained_response", {}, "Well. My answer is yes.", "My answer: yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nGo.\nSECTION 2\nStay.", "SECTION 1\nGo.\nSECTION two\nStay."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', '{"a": 1} and more'),
    ("detectable_format:title", {}, "<<Lamp Song>>\nThe lamp.", "<< >>\nThe lamp."),
    ("combination:two_responses", {}, "Shelly\n******\nTank", "Shelly\n******\nShelly"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name a planet with rings."},
     "name a planet with rings. Saturn.", "Sure! Name a planet with rings. Saturn."),
    ("startend:end_checker", {"end_phrase": "Happy baking!"}, 'Crumb Hall. "Happy baking!"', "Happy baking! Bye."),
    ("startend:quotation", {}, ' "Review daily." ', '"Review daily.'),
    ("change_case:english_capital", {}, "WATER WEEKLY, 2 TIMES.", "WATER WEEKLY, twice."),
    ("change_case:english_lowercase", {}, "rain on the harbour, 3 boats.", "rain on the Harbour."),
    ("change_case:english_lowercase", {}, "the café is open.", "кафе открыто."),  # not English
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "WEAR goggles. STAY-ALERT at all times.", "Wear goggles. STAY alert."),
    ("punctuation:no_comma", {}, "No commas here.", "One, comma."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_accepts_the_good_reply_and_rejects_the_near_miss(iid, kwargs, good, bad):
    assert follows(iid, good, kwargs) is True
    assert follows(iid, bad, kwargs) is False


def test_every_supported_instruction_has_cases():
    assert {c[0] for c in CASES} == set(SUPPORTED)


def test_a_blank_reply_follows_nothing_even_a_vacuous_instruction():
    assert follows("punctuation:no_comma", "No comma.") and not follows("punctuation:no_comma", "  \n")
    assert not follows("keywords:forbidden_words", "", {"forbidden_words": ["x"]})


def test_sentence_counting_handles_abbreviations_decimals_and_a_trailing_fragment():
    assert count_sentences("Mr. Brown paid 3.50 dollars, i.e. a lot. Then he left") == 2
    assert count_sentences("Wait... What?! Fine.") == 3
    assert count_sentences("") == 0


def test_kwargs_are_checked_with_one_line_errors_naming_the_field():
    with pytest.raises(ValueError, match="lack relation; it takes exactly: num_words, relation"):
        follows("length_constraints:number_words", "hi", {"num_words": 3})
    with pytest.raises(ValueError, match="unknown num_word"):
        follows("length_constraints:number_words", "hi", {"num_words": 3, "relation": "at least", "num_word": 1})
    with pytest.raises(ValueError, match="relation 'at most' is not one of"):
        follows("length_constraints:number_words", "hi", {"num_words": 3, "relation": "at most"})
    with pytest.raises(ValueError, match="num_bullets must be a whole number"):
        follows("detectable_format:number_bullet_lists", "* a", {"num_bullets": "3"})
    # The HF copy of IF-Eval pads every kwargs dict with all keys set to null: those are ignored.
    assert follows("punctuation:no_comma", "ok", {"num_words": None, "keywords": None})


def test_unknown_instruction_names_the_id_the_row_and_the_supported_ones():
    row = IFEvalRow(7, "p", ("language:response_language",), ({"language": "fr"},), "x.jsonl:3")
    with pytest.raises(ValueError) as err:
        select_rows([row])
    message = str(err.value)
    assert "x.jsonl:3 (key 7)" in message and "'language:response_language' is not supported" in message
    assert "punctuation:no_comma" in message and "unknown='skip'" in message and "\n" not in message


def test_skip_mode_drops_and_counts_unknown_instructions():
    mixed = IFEvalRow(1, "p", ("language:response_language", "punctuation:no_comma"), ({"language": "fr"}, {}))
    only_unknown = IFEvalRow(2, "q", ("language:response_language",), ({"language": "de"},))
    kept, skipped, dropped = select_rows([mixed, only_unknown], unknown="skip")
    assert [r.instruction_ids for r in kept] == [("punctuation:no_comma",)]
    assert skipped == {"language:response_language": 2} and dropped == 1


def test_score_counts_a_prompt_only_when_every_instruction_is_followed():
    rows, _, _ = select_rows([
        IFEvalRow(1, "p", ("punctuation:no_comma", "startend:quotation"), ({}, {})),
        IFEvalRow(2, "q", ("punctuation:no_comma",), ({},)),
    ])
    report = score(rows, ['"no commas"', "a, b"], [4, 6], [True, False])
    assert report.prompts == 2 and report.strict_prompt_accuracy == 0.5
    assert report.strict_instruction_accuracy == pytest.approx(2 / 3)
    assert report.per_instruction == {"punctuation:no_comma": 0.5, "startend:quotation": 1.0}
    assert report.instruction_counts == {"punctuation:no_comma": 2, "startend:quotation": 1}
    assert report.mean_response_tokens == 5 and report.truncated == 1
    assert "samples" not in report.summary() and report.to_json()["samples"][1]["followed"] == [False]


# ----------------------------------------------------------------------------- fixture and loader

# A reply per fixture row that follows all its instructions: the fixture asks for nothing impossible.
GOLD = {
    101: "drizzle taps the tin roofs while gulls wait on the wet pier.",
    102: "WATER ONLY WHEN THE SOIL IS DRY. GIVE THEM BRIGHT INDIRECT LIGHT.",
    103: "Mara stepped onto the old bridge and the river below whispered her name.",
    104: " ".join(["Sunlight is made of many colours and the air scatters blue light the most."] * 5),
    105: "It translates source code into machine code.",
    106: "Juicy, floral and bright, with a soft tang at the end.",
    107: "* You can travel more easily.\n* You meet new people.\n* It keeps the mind sharp.",
    108: "<<The Keeper>>\nOld stone tower\nLight across the sea\nShips pass safely\nThe keeper sleeps.",
    109: "Call it Crust & Crumb. Happy baking!",
    110: '"Review your notes every evening."',
    111: '```json\n{"name": "Peru", "capital": "Lima", "continent": "South America"}\n```',
    112: "A leap year has 366 days. It comes every four years.",
    113: "Boil water. Warm the pot. Add the tea. Pour the water. Wait four minutes.",
    114: "Green buds, green moss and green light fill the forest.",
    115: "We saw lions at the zoo.",
    116: "Bicycles appeared in 1817.\n***\nPedals came later.\n***\nToday they are everywhere.",
    117: "Clear the counters first.\n\nFinally, sweep and mop the floor.",
    118: "Join us on [date] at [address] for tea in the garden.",
    119: "Thank you for watering my plants!\n\nP.S. The tomatoes are yours.",
    120: "My answer is yes.",
    121: "Be *on time* and *prepare questions*.",
    122: "SECTION 1\nDrive up on Saturday.\nSECTION 2\nHike on Sunday.",
    123: "Shelly\n******\nSir Crawls-a-Lot",
    124: "Name a planet with rings. Saturn.",
    125: "ALWAYS wear goggles and NEVER leave the saw running.",
    126: "The moon drifts about 3.8 centimetres away from Earth every year. Good night.",
}


def test_fixture_covers_every_supported_instruction_and_is_satisfiable():
    rows = load_rows("fixture")
    assert len(rows) >= 24 and {i for r in rows for i in r.instruction_ids} == set(SUPPORTED)
    kept, _, _ = select_rows(rows)
    assert {r.key for r in kept} == set(GOLD)
    for row in kept:
        assert all(check_response(row, GOLD[row.key])), row.key
        assert not all(check_response(row, "")), row.key


def write(tmp_path, text: str):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    return path


GOOD_ROW = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def test_loader_reads_a_google_style_jsonl_and_skips_blank_lines(tmp_path):
    other = {**GOOD_ROW, "key": 2, "instruction_id_list": ["startend:quotation", "punctuation:no_comma"],
             "kwargs": [{"end_phrase": None}, {}]}
    rows = load_rows(write(tmp_path, json.dumps(GOOD_ROW) + "\n\n" + json.dumps(other) + "\n"))
    assert [r.key for r in rows] == [1, 2] and rows[1].where.endswith("rows.jsonl:3")


@pytest.mark.parametrize("text,message", [
    ('{"key": 1, "prompt": "p"', r"rows.jsonl:1: not valid JSON"),
    (json.dumps(GOOD_ROW) + "\n[1]", r"rows.jsonl:2: a row must be a JSON object"),
    (json.dumps({"key": 1, "prompt": "p", "kwargs": []}), r":1: missing field instruction_id_list"),
    (json.dumps({**GOOD_ROW, "kwargs": [{}, {}]}), r":1: field kwargs must hold one object per instruction id \(1\)"),
    (json.dumps({**GOOD_ROW, "prompt": " "}), r":1: field prompt must be a non-empty string"),
    (json.dumps(GOOD_ROW) + "\n" + json.dumps(GOOD_ROW), r":2: key 1 already used at line 1"),
    ("\n\n", r"no IF-Eval rows in this file"),
])
def test_loader_errors_name_the_file_line_and_field(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as err:
        load_rows(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_loader_names_a_missing_file_and_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl is not a file; give 'fixture' or the path"):
        load_rows(tmp_path / "nope.jsonl")


def test_prompt_seeds_follow_the_key_not_the_position():
    rows = load_rows("fixture")
    seeds = dict(zip([r.key for r in rows], prompt_seeds(rows, 42)))
    assert dict(zip([r.key for r in rows[::-1]], prompt_seeds(rows[::-1], 42))) == seeds
    assert len(set(seeds.values())) == len(rows) and prompt_seeds(rows[:1], 43) != prompt_seeds(rows[:1], 42)


def test_rows_are_checked_before_anything_is_generated():
    class NoWorkers:
        def generate(self, *args):
            raise AssertionError("generation started before the rows were checked")

    bad = [IFEvalRow(1, "p", ("language:response_language",), ({"language": "fr"},))]
    with pytest.raises(ValueError, match="is not supported"):
        run_ifeval(NoWorkers(), None, bad, reference_sampling())


# ----------------------------------------------------------------------------- lm-eval route

def test_lm_eval_route_says_why_it_cannot_run(monkeypatch, tmp_path):
    from oel_ray import ifeval_lmeval

    monkeypatch.setattr(ifeval_lmeval, "find_spec", lambda name: None)
    problem = ifeval_lmeval.lm_eval_problem()
    assert problem.startswith("lm_eval is not installed") and "\n" not in problem
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ifeval_lmeval.LmEvalUnavailable, match="lm_eval is not installed"):
        ifeval_lmeval.run_lm_eval_ifeval(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a saved Hugging Face checkpoint"):
        ifeval_lmeval.run_lm_eval_ifeval(str(tmp_path / "missing"))


def fake_lm_eval(root, dataset_path: str, record) -> None:
    """A stand-in lm_eval package with the surface we call (simple_evaluate, the vLLM backend's
    signature, the ifeval task's yaml), recording how it was called."""
    pkg = root / "lm_eval"
    (pkg / "tasks" / "ifeval").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        import json
        def simple_evaluate(**kwargs):  # one line per call
            open({str(record)!r}, "a").write(json.dumps(kwargs) + "\\n")
            return {{"results": {{"ifeval": {{"alias": "ifeval", "prompt_level_strict_acc,none": 0.25,
                     "prompt_level_strict_acc_stderr,none": 0.1, "inst_level_strict_acc,none": 0.5}}}}}}
    """))
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "vllm_causallms.py").write_text(
        "class VLLM:\n    def __init__(self, pretrained, enable_thinking=True, seed=1234, **kwargs): pass\n")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "tasks" / "ifeval" / "__init__.py").write_text("")
    (pkg / "tasks" / "ifeval" / "instructions_util.py").write_text("")
    (pkg / "tasks" / "ifeval" / "ifeval.yaml").write_text(f"task: ifeval\ndataset_path: {dataset_path}\n")
    # and the one `datasets` call the availability check makes: a local directory loads, else it raises
    (root / "datasets").mkdir()
    (root / "datasets" / "__init__.py").write_text(textwrap.dedent("""
        import os
        def load_dataset(path, split):
            if not os.path.isdir(path):
                raise FileNotFoundError(path)
            return []
    """))


def fake_lm_eval_with_data(tmp_path):
    """The fake lm_eval package under tmp_path/site, its IF-Eval data present; returns where it
    records its calls."""
    data = tmp_path / "ifeval_data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    record = tmp_path / "called.json"
    fake_lm_eval(tmp_path / "site", str(data), record)
    return record


def test_lm_eval_route_calls_the_vllm_backend_with_the_reference_settings(monkeypatch, tmp_path):
    from oel_ray import ifeval_lmeval

    record = fake_lm_eval_with_data(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lm_eval", raising=False)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")

    assert ifeval_lmeval.lm_eval_problem() is None
    metrics = ifeval_lmeval.run_lm_eval_ifeval(str(checkpoint), max_model_len=2048)
    assert metrics == {"prompt_level_strict_acc": 0.25, "inst_level_strict_acc": 0.5}
    called = json.loads(record.read_text())
    assert called["model"] == "vllm" and called["tasks"] == ["ifeval"] and called["apply_chat_template"] is True
    assert called["model_args"] == {"pretrained": str(checkpoint), "enable_thinking": False, "seed": 42,
                                    "max_model_len": 2048, "dtype": "auto", "gpu_memory_utilization": 0.85}
    assert dict(kv.split("=") for kv in called["gen_kwargs"].split(",")) == {
        "do_sample": "True", "temperature": "0.7", "top_p": "0.8", "top_k": "20", "max_gen_toks": "1280"}
    assert {called[k] for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")} == {42}

    # The same package whose task data is not on this machine: refused, offline, with the reason.
    (tmp_path / "site" / "lm_eval" / "tasks" / "ifeval" / "ifeval.yaml").write_text(
        "dataset_path: nobody-here/no-such-ifeval\n")
    problem = ifeval_lmeval.lm_eval_problem()
    assert "'nobody-here/no-such-ifeval' is not available offline" in problem and "\n" not in problem


@pytest.mark.e2e
def test_ood_lm_eval_scores_every_rounds_saved_checkpoint_beside_the_pass_rate(tmp_path, tiny_model, smallest_tiny,
                                                                             warm_run, monkeypatch):
    """ood.ifeval=lm_eval through the entry point, with the stand-in lm_eval (the real one needs
    its data from the hub): round 0 on the initial model, round r on round_r/model."""
    record = fake_lm_eval_with_data(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lm_eval", raising=False)
    out = tmp_path / "run"
    proc = warm_run([*smallest_tiny, f"model.path={tiny_model}", "ood.ifeval=lm_eval", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["model_args"]["pretrained"] for c in calls] == [tiny_model, str(out / "round_1" / "model")]
    assert all(c["tasks"] == ["ifeval"] and c["gen_kwargs"].endswith(",max_gen_toks=16") for c in calls)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert {"round_0/ifeval", "round_1/ifeval"} <= set(stages)
    assert not (out / "round_1" / "ifeval.json").exists()  # the team's checker did not run as well
    for r in (0, 1):
        measured = json.loads((out / f"round_{r}" / "ifeval_lm_eval.json").read_text())
        assert measured["strict_prompt_accuracy"] == 0.25 and measured["lm_eval"]["inst_level_strict_acc"] == 0.5
    table = (out / "rounds.md").read_text().splitlines()
    assert "IF-Eval strict" in table[0] and all("| 0.250 |" in row for row in table[2:4])
    assert json.loads((out / "summary.json").read_text())["ifeval_strict_prompt_accuracy"] == 0.25
    assert "IF-Eval prompt-level strict accuracy (OOD) 0.250" in proc.stdout


# ----------------------------------------------------------------------------- real engine

@pytest.fixture(scope="module")
def workers(ray_cluster, tiny_model):
    from oel_ray.config import ModelConfig
    from oel_ray.rollout import RolloutGroup

    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None, max_model_len=2048), num_workers=1, seed=0,
                           max_logprobs=1, kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    yield workers
    workers.shutdown()


def test_run_ifeval_on_the_tiny_model_scores_its_real_replies(workers, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = load_rows("fixture")
    sampling = reference_sampling(max_tokens=48)
    report = run_ifeval(workers, tokenizer, rows, sampling)

    assert report.prompts == len(rows) == len(report.samples)
    assert [s["key"] for s in report.samples] == [r.key for r in rows]
    assert all(0 < s["response_tokens"] <= 48 for s in report.samples)
    assert report.mean_response_tokens == pytest.approx(sum(s["response_tokens"] for s in report.samples) / len(rows))
    # Recompute from the replies themselves: the report scores what the engine produced.
    followed = {r.key: check_response(r, s["response"]) for r, s in zip(select_rows(rows)[0], report.samples)}
    assert {s["key"]: s["followed"] for s in report.samples} == followed
    assert report.strict_prompt_accuracy == sum(all(f) for f in followed.values()) / len(rows)
    assert set(report.per_instruction) == set(SUPPORTED)
    assert 0 <= report.ci_low <= report.strict_prompt_accuracy <= report.ci_high <= 1
    print(f"\ntiny model on the fixture: {report.markdown()}")

    # Seeds follow the row key: reversed order and a subset give each prompt the same reply.
    again = run_ifeval(workers, tokenizer, rows[::-1][:5], sampling)
    replies = {s["key"]: s["response"] for s in report.samples}
    assert all(s["response"] == replies[s["key"]] for s in again.samples)


def test_run_ifeval_skip_mode_reports_what_it_left_out(workers, tiny_model):
    from transformers import AutoTokenizer

    rows = load_rows("fixture")[:2] + [IFEvalRow(999, "Parlez-moi.", ("language:response_language",),
                                                  ({"language": "fr"},))]
    report = run_ifeval(workers, AutoTokenizer.from_pretrained(tiny_model), rows,
                        Sampling(max_tokens=8, temperature=0.7, seed=1, support_k=4), unknown="skip")
    assert report.prompts == 2 and report.skipped_prompts == 1
    assert report.skipped_instructions == {"language:response_language": 1}


def test_lm_eval_route_refuses_missing_data_in_one_line(monkeypatch, tmp_path):
    from oel_ray import ifeval_lmeval

    fake_lm_eval(tmp_path / "site", str(tmp_path / "no_such_data"), tmp_path / "called.json")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lm_eval", raising=False)
    problem = ifeval_lmeval.lm_eval_problem()
    assert "is not available offline (FileNotFoundError)" in problem and "\n" not in problem
