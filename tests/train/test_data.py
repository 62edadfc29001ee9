"""Byte-level corpus, packing into sequences, and the seeded, stateless sample order."""

import json

import pytest
import torch

from ring_flash_attn.train.config import ConfigError, DataConfig
from ring_flash_attn.train.data import EOS, BatchPlan, PackedDataset, documents, pack


def test_pack_appends_eos_after_every_document():
    stream = pack(iter([b"ab", b"", b"c"]))
    assert stream.tolist() == [97, 98, EOS, EOS, 99, EOS]


def test_sequences_are_cut_with_one_extra_token_for_the_shifted_labels():
    stream = torch.arange(23, dtype=torch.int16)
    dataset = PackedDataset(stream, seq_len=4, seed=0)
    assert dataset.num_sequences == 4  # 23 // 5; the tail that does not fill a sequence is dropped
    batch = dataset.batch([0, 1])
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (2, 4)
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])  # labels are inputs shifted by one
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3]


def test_order_is_a_seeded_permutation_per_epoch():
    stream = torch.arange(10 * 9, dtype=torch.int16)
    a, b, c = (PackedDataset(stream, 8, seed) for seed in (1, 1, 2))
    first_epoch = [a.sample(i)[0].item() // 9 for i in range(10)]
    assert sorted(first_epoch) == list(range(10))  # every sequence once per epoch
    assert first_epoch == [b.sample(i)[0].item() // 9 for i in range(10)]  # same seed, same order
    assert first_epoch != [c.sample(i)[0].item() // 9 for i in range(10)]  # another seed, another order
    second_epoch = [a.sample(i)[0].item() // 9 for i in range(10, 20)]
    assert sorted(second_epoch) == list(range(10)) and second_epoch != first_epoch
    assert torch.equal(a.sample(3), PackedDataset(stream, 8, 1).sample(3))  # no state: index -> sample


def test_batch_plan_gives_every_replica_distinct_samples_in_step_order():
    plan = BatchPlan(dp_size=2, micro_batch_size=2, grad_accum=2)
    seen = [i for step in range(3) for micro in range(2) for dp in range(2) for i in plan.indices(step, micro, dp)]
    assert seen == list(range(3 * plan.samples_per_step))
    assert plan.global_indices(1, 1) == plan.indices(1, 1, 0) + plan.indices(1, 1, 1)


def test_stdlib_corpus_is_deterministic_and_bounded():
    config = DataConfig(max_bytes=50_000, seq_len=128)
    one, two = PackedDataset.from_config(config), PackedDataset.from_config(config)
    assert one.fingerprint == two.fingerprint
    assert 50_000 // 129 - 5 <= one.num_sequences <= 50_000 // 129 + 5  # bytes plus one EOS per document
    assert int(one.sequences.max()) <= EOS


def test_user_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    text = list(documents(DataConfig(source="files", path=str(tmp_path), format="text")))
    assert text == [b"hello", b"world"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "x", "id": 2}) + "\n")
    assert list(documents(DataConfig(source="files", path=str(jsonl), format="jsonl"))) == ["héllo".encode(), b"x"]
    assert list(documents(DataConfig(source="files", path=str(tmp_path / "*.txt")))) == [b"hello", b"world"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', r"docs.jsonl:2 is not valid JSON"),
    ('{"body": "no text key"}\n', r"docs.jsonl:1 has no string field 'text'"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"docs.jsonl:2 is not UTF-8 text \(byte 0xe9 at column 14\): JSON lines "
                                              r"must be UTF-8"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        list(documents(DataConfig(source="files", path=str(tmp_path / "docs.jsonl"), format="jsonl")))


def test_missing_data_and_too_little_data(tmp_path):
    with pytest.raises(ConfigError, match="data.path: no such file, directory or glob match"):
        list(documents(DataConfig(source="files", path=str(tmp_path / "absent.txt"))))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="data.seq_len: the corpus has 5 tokens, fewer than one sequence"):
        PackedDataset.from_config(DataConfig(source="files", path=str(tmp_path / "short.txt"), seq_len=64))


def test_document_mask_restarts_positions_and_drops_the_target_across_a_boundary():
    from ring_flash_attn.train.data import IGNORE_INDEX, document_cu_seqlens

    stream = torch.tensor([5, 6, EOS, 7, EOS, 8, 9, 10, 11], dtype=torch.int16)  # one sequence of 8 + 1 tokens
    batch = PackedDataset(stream, seq_len=8, seed=0).batch([0], document_mask=True)
    assert batch.input_ids[0].tolist() == [5, 6, EOS, 7, EOS, 8, 9, 10]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    # The prediction at an EOS would be the next document's first token: not a target.
    assert batch.labels[0].tolist() == [6, EOS, IGNORE_INDEX, EOS, IGNORE_INDEX, 9, 10, 11]
    assert batch.num_targets == 6
    two_rows = torch.stack([batch.position_ids[0], batch.position_ids[0]])
    assert document_cu_seqlens(two_rows).tolist() == [0, 3, 5, 8, 11, 13, 16]
