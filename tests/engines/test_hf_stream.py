"""The transformers engine hands results back as it goes: requests are taken a window at a time (never splitting
the responses to one item), batches are prepared in a thread ahead of the device across windows when there are
preprocessing workers, images are decoded within limits to about the processor's size, and a bad image costs
its own request only: it comes back as an ImageFileError naming the file, after the rest of its batch."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import misguard.engines.hf as hf
from misguard.core.errors import DataError
from misguard.engines import EngineOptions
from misguard.engines.base import runs
from misguard.engines.families import processor_pixels
from misguard.engines.hf import TransformersEngine, prefetched
from misguard.engines.messages import ImageFileError, image_area, images_key, load_image
from misguard.judges.templates import get_template
from tests.engines.test_hf_pipeline import label_probs
from tests.engines.test_prefix_reuse import judge_requests


def test_windows_never_split_an_items_responses_and_change_no_result(tiny_judge, easy, labels, monkeypatch):
    requests = judge_requests(easy, n_items=8)  # items with 1, 2, 3, 4, 1, 2, 3, 4 responses
    whole, _ = label_probs(tiny_judge, requests, labels, batch_size=8)  # one window
    groups = []
    real_score_tails = hf.score_tails

    def recording(net, prefix, shared, *args):
        groups.extend(len(g.members) for g in shared)
        return real_score_tails(net, prefix, shared, *args)

    monkeypatch.setattr(hf, "score_tails", recording)
    monkeypatch.setattr(hf, "WINDOW_BATCHES", 1)  # windows of about 4 requests: every item's would be cut
    windowed, _ = label_probs(tiny_judge, requests, labels, batch_size=1)
    assert sorted(groups) == [2, 2, 3, 3, 4, 4]
    np.testing.assert_allclose(windowed, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_prepared_ahead_of_the_model_only_with_workers(tiny_judge, easy, labels, monkeypatch, workers):
    requests = judge_requests(easy, n_items=8)
    events = []
    real_prepare, real_label_batch = TransformersEngine._prepare, TransformersEngine._label_batch

    def prepare(self, batch):
        inputs = real_prepare(self, batch)
        events.append("prepared")
        return inputs

    def label_batch(self, inputs, token_ids):
        events.append("forward")
        time.sleep(0.1)  # a device busy long enough for the thread to prepare what comes next
        return real_label_batch(self, inputs, token_ids)

    monkeypatch.setattr(TransformersEngine, "_prepare", prepare)
    monkeypatch.setattr(TransformersEngine, "_label_batch", label_batch)
    monkeypatch.setattr(hf, "WINDOW_BATCHES", 1)
    label_probs(tiny_judge, requests, labels, batch_size=2, prefix_reuse=False, preprocess_workers=workers)
    # Batches prepared by the time each forward pass starts, beyond the one it runs.
    ahead = [events[:i].count("prepared") - events[:i].count("forward") - 1
             for i, event in enumerate(events) if event == "forward"]
    assert len(ahead) >= 10  # 20 requests in windows of about one batch
    if workers:  # the queue full, and one more done in the thread's hands
        assert hf.PREPARED_AHEAD <= max(ahead) <= hf.PREPARED_AHEAD + 1 and min(ahead) >= 0
    else:
        assert set(ahead) == {0}


def broken_image(tmp_path, easy, kind: str):
    """A truncated PNG (its header, hence its size, reads; its pixels do not) or a missing file."""
    path = tmp_path / f"{kind}.png"
    if kind == "truncated":
        data = easy.image_paths(easy.items[0])[0].read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("prefix_reuse", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["truncated", "missing"])
def test_a_bad_image_costs_its_own_request_after_the_rest_of_its_batch(tiny_judge, easy, labels, tmp_path,
                                                                       monkeypatch, workers, kind, prefix_reuse):
    # A truncated image's header reads (it is batched, and fails at decoding); a missing one fails at staging.
    bad = broken_image(tmp_path, easy, kind)
    item = easy.items[0]
    requests = judge_requests(easy, n_items=8)
    bad_index = 3
    requests.insert(bad_index, get_template("mis-judge-codes-v1").request(
        "bad", [bad, easy.image_paths(item)[1]], item.question, "a response"))
    monkeypatch.setattr(hf, "WINDOW_BATCHES", 1)
    with TransformersEngine(str(tiny_judge), EngineOptions(batch_size=2, preprocess_workers=workers,
                                                          prefix_reuse=prefix_reuse)) as engine:
        returned = list(engine.label_stream(requests, labels))
        window_size = engine.label_chunk_size
    assert sorted(index for index, _ in returned) == list(range(len(requests)))  # every other request came back
    failed = [(position, index, result) for position, (index, result) in enumerate(returned)
              if isinstance(result, ImageFileError)]
    assert [index for _, index, _ in failed] == [bad_index]
    position, _, error = failed[0]
    assert isinstance(error, DataError) and error.path == str(bad) and f"{kind}.png" in str(error)
    assert error.code == ("image_not_found" if kind == "missing" else "invalid_image")
    # Whatever ran beside it (its window's other requests) was handed back before it.
    window = next(w for w in runs(range(len(requests)), window_size, key=lambda i: images_key(requests[i].messages))
                  if bad_index in w)
    before = {index for index, _ in returned[:position]}
    assert set(window) - {bad_index} <= before


def test_images_are_decoded_within_the_limits_and_to_about_the_processors_size(tiny_judge, easy, labels,
                                                                                tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (1400, 1000), (200, 30, 30)).save(big)
    item = easy.items[0]
    request = get_template("mis-judge-codes-v1").request("big", [big, easy.image_paths(item)[1]], item.question,
                                                         "a response")
    with TransformersEngine(str(tiny_judge), EngineOptions(batch_size=2)) as engine:
        budget = engine.image_pixels
        assert budget == processor_pixels(engine.processor.image_processor.to_dict()) and budget < 1400 * 1000
        (_, (decoded, _)), = engine.prepare_all([request])
        # Decoded smaller than the file, yet no smaller than the processor's own budget: the processor still
        # sets the size the model sees.
        assert budget <= decoded.width * decoded.height < 4 * budget  # core.images: never below the target
    with TransformersEngine(str(tiny_judge), EngineOptions(batch_size=2, max_image_pixels=1400 * 1000 - 1)) as engine:
        (index, refused), = engine.label_stream([request], labels)
    assert isinstance(refused, ImageFileError) and refused.code == "image_too_large" and "big.png" in str(refused)


def test_image_area_reads_only_the_header(tmp_path, easy):
    good = easy.image_paths(easy.items[0])[0]
    im = load_image(good)
    assert image_area(good) == im.width * im.height == image_area(im)
    truncated = broken_image(tmp_path, easy, "truncated")
    assert image_area(truncated) == im.width * im.height
    with pytest.raises(DataError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(DataError, match="missing.png"):
        image_area(tmp_path / "missing.png")


def test_prefetched_runs_ahead_by_a_bounded_number_and_keeps_order():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    it = prefetched(items(), 2)
    assert next(it) == 0
    time.sleep(0.5)
    # One taken, two waiting, and at most one more in the producer's hands.
    assert 3 <= len(produced) <= 4
    assert [0, *it] == list(range(10))


def test_prefetched_raises_the_producers_error_in_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("the third item")

    got = []
    with pytest.raises(ValueError, match="the third item"):
        for item in prefetched(items(), 2):
            got.append(item)
    assert got == [1, 2]


def test_prefetched_stops_its_thread_when_the_consumer_stops():
    produced = []

    def endless():
        while True:
            produced.append(1)
            yield len(produced)

    it = prefetched(endless(), 2)
    assert next(it) == 1
    it.close()
    time.sleep(0.5)
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at <= 5
    assert not any(t.name == "misguard-prepare" and t.is_alive() for t in threading.enumerate())


def test_runs_keep_equal_keys_together():
    items = [1, 1, 2, 2, 2, 3, 4, 4]
    assert list(runs(items, 3)) == [[1, 1, 2], [2, 2, 3], [4, 4]]
    assert list(runs(items, 3, key=lambda x: x)) == [[1, 1, 2, 2, 2], [3, 4, 4]]
    assert list(runs(items, 0)) == [[x] for x in items]
