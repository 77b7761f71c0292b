"""`quantselect compare`'s selection and text, on datasets and per-item results of each kind (the
end-to-end runs are in test_cli and test_api, on real jobs)."""

from __future__ import annotations

from dataclasses import replace

from quantselect.domain.compare import compare_items
from quantselect.domain.dataset import parse_records
from quantselect.domain.results import ItemResult
from quantselect.render import comparison_text

MC = parse_records([{"prompt": f"Q{i}?", "choices": ["yes", "no"], "answer": i % 2, "category": "c" if i < 3 else None}
                    for i in range(6)])


def test_the_items_scored_differently_worst_first_with_what_each_answered():
    base = [ItemResult(i, True, i % 2) for i in range(6)]  # right on every item
    cand = [ItemResult(0, True, 0), ItemResult(1, False, 0), ItemResult(2, False, 1), ItemResult(3, True, 1),
            ItemResult(4, True, 0)]  # wrong on 1 and 2; item 5 not scored (stopped early)
    c = compare_items(MC, "int4", cand, "baseline", base)
    assert (c.n_items, c.n_worse, c.n_better, c.n_same, c.n_only_one) == (5, 2, 0, 3, 1)
    assert (c.candidate_score, c.against_score) == (0.6, 1.0)
    assert [d.index for d in c.worse] == [1, 2] and not c.better
    d = c.worse[0]
    assert (d.prompt, d.expected, d.against_output, d.candidate_output, d.category) == ("Q1?", "no", "no", "yes", "c")
    # The other way round: the same items, better.
    back = compare_items(MC, "baseline", base, "int4", cand, limit=1)
    assert back.n_better == 2 and [d.index for d in back.better] == [1] and not back.worse
    text = comparison_text(c)
    assert text.splitlines()[0] == ("int4 against baseline on 5 items (accuracy): 2 worse, 0 better, 3 the same; "
                                    "mean score 0.600 vs 1.000")
    assert "(1 items scored by only one of the two are left out)" in text
    assert "  item 1 [c]: score 1 -> 0" in text and "    int4:     yes" in text and "    expected: no" in text
    assert "Better" not in text
    assert "Worse (2, 1 shown)" in comparison_text(compare_items(MC, "int4", cand, "baseline", base, limit=1))


def test_generation_and_label_free_items():
    gen = parse_records([{"prompt": "Say\nhi", "reference": "hi"}, {"prompt": "2+2", "reference": "4"}])
    c = compare_items(gen, "w8a8", [ItemResult(0, False, "bye\nnow"), ItemResult(1, True, "4")],
                      "baseline", [ItemResult(0, True, "hi"), ItemResult(1, False, "5")])
    assert [d.candidate_output for d in c.worse] == ["bye\nnow"] and [d.against_output for d in c.better] == ["5"]
    text = comparison_text(c)
    assert "    prompt:   Say ⏎ hi" in text and "    w8a8:     bye ⏎ now" in text
    # Label-free: graded scores, the largest drop first; outputs only where the metric stored them.
    prompts = parse_records([{"prompt": f"p{i}"} for i in range(3)])
    base = [ItemResult(i, True, {"top1_agreement": 1.0}, score=1.0) for i in range(3)]
    cand = [ItemResult(0, False, {"top1_agreement": 0.9}, score=0.9), ItemResult(1, False, {"top1_agreement": 0.5}, score=0.5),
            ItemResult(2, True, {"top1_agreement": 1.0, "output": "same"}, score=1.0)]
    c = compare_items(prompts, "int4", cand, "baseline", base)
    assert [d.index for d in c.worse] == [1, 0] and c.n_same == 1 and c.worse[0].candidate_output is None
    assert c.worse[0].expected is None and "score 1 -> 0.500" in comparison_text(c)
    assert "expected" not in comparison_text(c) and "int4:" not in comparison_text(c)  # nothing stored to show
    # A generation dataset scored label-free: its references are not what the metric expects.
    c = compare_items(replace(gen, metric="top1_agreement"), "int4",
                      [ItemResult(0, False, {}, score=0.5)], "baseline", [ItemResult(0, True, {}, score=1.0)])
    assert c.worse[0].expected is None
