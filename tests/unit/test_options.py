"""EngineOptions (actors/options.py): every field documented and checked when built, and typed
parsing of the string args that `serve run deploy.app:build_app key=value ...` passes."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.options import EngineOptions, parse_arg, reference

FIELDS = {f.name: f for f in dataclasses.fields(EngineOptions)}


def test_every_option_has_a_doc_and_its_default_is_valid():
    for name, field in FIELDS.items():
        assert len(field.metadata.get("doc", "").split()) >= 8, name
        assert f"{name} (" in reference()
    assert EngineOptions() == EngineOptions.from_args({})


@given(st.integers(min_value=1, max_value=10**6))
def test_integer_args_parse_from_their_text(n):
    options = EngineOptions.from_args({"expert_replicas": str(n), "frontend_threads": f" {n} "})
    assert (options.expert_replicas, options.frontend_threads) == (n, n)


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False))
def test_number_args_parse_from_their_text(x):
    options = EngineOptions.from_args({"placement_timeout_s": repr(x),
                                       "failover_timeout_s": str(int(x) + 1)})
    assert options.placement_timeout_s == x and options.failover_timeout_s == int(x) + 1


@given(st.dictionaries(st.sampled_from(["CPU", "GPU", "expert", "memory"]),
                       st.integers(min_value=0, max_value=64) | st.floats(0, 64)))
def test_mapping_args_parse_from_json(resources):
    options = EngineOptions.from_args({"expert_resources": json.dumps(resources)})
    assert options.expert_resources == resources


@pytest.mark.parametrize("word", ["none", "None", "null", "NULL"])
def test_none_words_give_none_where_a_field_allows_it(word):
    options = EngineOptions.from_args({"expert_threads": word, "engine_args": word,
                                       "expert_autoscaling": word})
    assert options.expert_threads is None and options.engine_args is None
    assert options.autoscaling is None


def test_string_fields_and_typed_values_pass_unchanged():
    options = EngineOptions.from_args({"dtype": "bfloat16", "device": "cuda",
                                       "expert_replicas": 2, "engine_args": {"max_num_seqs": 8}})
    assert (options.dtype, options.device, options.expert_replicas) == ("bfloat16", "cuda", 2)
    assert options.engine_args == {"max_num_seqs": 8}


def test_prefix_caching_turns_off_through_the_serve_command_line():
    """`serve run ... engine_args='{"enable_prefix_caching": false}'` (issue 23)."""
    options = EngineOptions.from_args({"engine_args": '{"enable_prefix_caching": false}'})
    assert options.engine_args == {"enable_prefix_caching": False}


def test_nested_json_reaches_the_autoscaling_policy():
    options = EngineOptions.from_args(
        {"expert_autoscaling": '{"target_load_ratio": 1.5, "window_s": 10}'})
    assert options.autoscaling.target_load_ratio == 1.5
    assert options.frontend_dispatch_args() == {"load_window_s": 10}
    assert EngineOptions(expert_autoscaling={"target_load_ratio": 1.5}, dispatch_args={
        "load_window_s": 3}).frontend_dispatch_args() == {"load_window_s": 3}


@pytest.mark.parametrize("arg, text, says", [
    ("expert_replicas", "two", "expert_replicas expects an integer, got 'two'"),
    ("expert_replicas", "1.5", "expert_replicas expects an integer, got '1.5'"),
    ("expert_replicas", "none", "expert_replicas expects an integer, got 'none'"),
    ("frontend_threads", "", "frontend_threads expects an integer or one of ('none', 'null')"),
    ("placement_timeout_s", "soon", "placement_timeout_s expects a number, got 'soon'"),
    ("expert_resources", "GPU=1", "expert_resources expects a JSON object or one of"),
    ("engine_args", "[1, 2]", "engine_args expects a JSON object"),
    ("engine_args", "{'max_num_seqs': 8}", "engine_args expects a JSON object")])
def test_a_bad_string_names_the_arg_and_what_it_expects(arg, text, says):
    with pytest.raises(ValueError, match=rf"^{re.escape(says)}"):
        EngineOptions.from_args({arg: text})


@given(st.text(max_size=12).filter(lambda t: not _is_int(t)))
def test_any_non_integer_text_is_refused_naming_the_arg(text):
    with pytest.raises(ValueError, match="^experts_per_actor expects an integer"):
        EngineOptions.from_args({"experts_per_actor": text})


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("field, value, says", [
    ("device", "tpu", r"device must be one of \('cpu', 'cuda'\), got 'tpu'"),
    ("transport", "bogus", "transport must be one of"),
    ("dtype", "fp8", "dtype must be 'auto' or one of"),
    ("expert_replicas", 0, "expert_replicas must be an integer >= 1, got 0"),
    ("experts_per_actor", True, "experts_per_actor must be an integer >= 1, got True"),
    ("expert_threads", 0, "expert_threads must be a positive integer or None"),
    ("placement_timeout_s", 0, "placement_timeout_s must be a positive number of seconds"),
    ("failover_timeout_s", math.inf, "failover_timeout_s must be a positive number of seconds"),
    ("failover_timeout_s", math.nan, "failover_timeout_s must be a positive number of seconds"),
    ("expert_resources", {"GPU": -1}, "expert_resources must be a mapping of Ray resource"),
    ("frontend_resources", [1], "frontend_resources must be a mapping of Ray resource"),
    ("engine_args", {"max_seqs": 8}, r"unknown engine_args keys \['max_seqs'\]; expected some "
                                     r"of \[.*'max_num_seqs'"),
    ("engine_args", {"device": "cuda"}, r"unknown engine_args keys \['device'\]"),
    ("dispatch_args", {"retries": 2}, r"unknown dispatch_args keys \['retries'\]"),
    ("dispatch_args", 3, "dispatch_args must be a mapping of"),
    ("expert_autoscaling", {"max_replicas": 2}, "exactly one of target_rows_per_s")])
def test_a_bad_value_names_the_field_and_its_limit(field, value, says):
    with pytest.raises(ValueError, match=says):
        EngineOptions(**{field: value})


def test_parse_arg_leaves_non_strings_and_str_fields_alone():
    assert parse_arg("x", int, 3) == 3 and parse_arg("x", int | None, None) is None
    assert parse_arg("dtype", str, "none") == "none"
    assert parse_arg("x", dict | None, {"a": 1}) == {"a": 1}
