import datetime as dt

import pytest

from qlora_tutorial import tasks


def test_answer_format():
    assert tasks.date_in_words(dt.date(2021, 7, 4)) == "4 July 2021"
    assert tasks.date_in_words(dt.date(1900, 1, 31)) == "31 January 1900"
    assert tasks.date_in_words(dt.date(2099, 12, 1)) == "1 December 2099"


def test_example_fields():
    ex = tasks.date_example(dt.date(2021, 7, 4))
    assert ex == {"iso": "2021-07-04", "prompt": "Date: 2021-07-04\nIn words:", "answer": "4 July 2021"}


def test_deterministic_and_seed_dependent():
    assert tasks.date_task(30, 10, seed=3) == tasks.date_task(30, 10, seed=3)
    assert tasks.date_task(30, 10, seed=3) != tasks.date_task(30, 10, seed=4)


def test_splits_are_disjoint_and_sized():
    train, test = tasks.date_task(400, 50, seed=0)
    assert len(train) == 400 and len(test) == 50
    assert not {e["iso"] for e in train} & {e["iso"] for e in test}
    assert len({e["iso"] for e in train}) == 400


def test_answers_match_the_iso_date():
    train, _ = tasks.date_task(200, 0, seed=1)
    for e in train:
        d = dt.date.fromisoformat(e["iso"])
        assert tasks.FIRST_YEAR <= d.year <= tasks.LAST_YEAR
        day, month, year = e["answer"].split(" ")
        assert (int(day), tasks.MONTHS.index(month) + 1, int(year)) == (d.day, d.month, d.year)
        assert not day.startswith("0")


def test_covers_all_months():
    train, _ = tasks.date_task(400, 0, seed=0)
    assert {e["answer"].split(" ")[1] for e in train} == set(tasks.MONTHS)


def test_datasets_columns():
    train, test = tasks.date_datasets(8, 4, seed=0)
    assert train.column_names == ["iso", "prompt", "answer"]
    assert (len(train), len(test)) == (8, 4)
    assert list(train) == tasks.date_task(8, 4, seed=0)[0]


def test_sample_dates_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        tasks.sample_dates(-1)
    with pytest.raises(ValueError, match="holds only 365"):
        tasks.sample_dates(366, first_year=2001, last_year=2001)
    with pytest.raises(ValueError, match="first_year"):
        tasks.sample_dates(3, first_year=2000, last_year=1999)


def test_clean_answer():
    assert tasks.clean_answer(" 4 July 2021\nDate: 1999") == "4 July 2021"
    assert tasks.clean_answer("\n\n 4 July 2021 ") == "4 July 2021"
    assert tasks.clean_answer("   \n") == ""


def test_exact_match():
    assert tasks.exact_match([" 4 July 2021", "4 Jul 2021"], ["4 July 2021", "4 July 2021"]) == 0.5
    assert tasks.exact_match(["x"], ["x"]) == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        tasks.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no answers"):
        tasks.exact_match([], [])
