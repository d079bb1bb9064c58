"""The streams transport's names and settings, without Redis."""

from __future__ import annotations

import os

import pytest

from activation.config import load_settings
from activation.errors import ConfigError
from activation.transport.streams.keys import StreamKeys, consumer_name


def test_every_key_of_a_worker_carries_its_hash_tag():
    keys = StreamKeys("marie")
    assert keys.tasks == "{activation:marie}:tasks"
    assert keys.results == "{activation:marie}:results"
    assert keys.dead == "{activation:marie}:dead"
    assert keys.task("t-1") == "{activation:marie}:task:t-1"
    assert keys.group == "marie"


def test_a_worker_name_that_could_break_the_hash_tag_is_refused():
    with pytest.raises(ConfigError, match="WORKER_NAME"):
        StreamKeys("ma}rie")


def test_a_consumer_name_names_host_and_this_process_start():
    name = consumer_name(host="box")
    host, boot, process = name.split("/")
    pid, start, nonce = process.split("-")
    assert host == "box" and len(boot) == 8 and int(pid) == os.getpid() and int(start) > 0 and len(nonce) == 6
    assert consumer_name(host="box") == name  # stable within one process start


def test_streams_settings_are_parsed():
    settings = load_settings(
        env={
            "ACTIVATION_TRANSPORT": "streams",
            "ACTIVATION_LEASE": "30",
            "REDIS_SENTINELS": "10.0.0.1:26379, sentinel-2:26380",
            "REDIS_SENTINEL_MASTER": "activation",
        }
    )
    assert settings.transport == "streams" and settings.lease == 30
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-2", 26380))
    assert settings.redis_sentinel_master == "activation"


def test_the_transport_defaults_to_files_with_a_two_minute_lease():
    settings = load_settings(env={})
    assert (settings.transport, settings.lease, settings.redis_sentinels) == ("files", 120.0, ())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACTIVATION_TRANSPORT": "carrier-pigeon"}, "ACTIVATION_TRANSPORT: expected one of files, streams"),
        ({"ACTIVATION_TRANSPORT": "streams"}, "ACTIVATION_TRANSPORT: streams needs REDIS_URL or REDIS_SENTINELS"),
        ({"ACTIVATION_LEASE": "0"}, "ACTIVATION_LEASE: must be at least"),
        ({"REDIS_SENTINELS": "sentinel"}, "REDIS_SENTINELS: expected a comma-separated list of HOST:PORT"),
        ({"REDIS_SENTINELS": "a:1", "REDIS_CLUSTER": "yes"}, "REDIS_CLUSTER: a Redis Cluster is not reached"),
    ],
)
def test_a_bad_streams_setting_is_a_one_line_error(env, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert message in str(caught.value) and "\n" not in str(caught.value)
