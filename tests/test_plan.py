"""`ranklens plan`: the memory per rank is the tensors' sizes, split by the layout."""

from ranklens.cli import main
from ranklens.train.config import PlanConfig
from ranklens.train.plan import memory_plan


def test_parts_are_the_tensor_sizes_and_split_by_blocks():
    cfg = PlanConfig(n_features=1 << 20, batch_size=4096, k=50, aux_k=0, shuffle_buffer_tokens=262_144)
    one = memory_plan(cfg, 4096, world_size=1, shards=1)
    eight = memory_plan(cfg, 4096, world_size=8, shards=8)
    params = 2 * (1 << 20) * 4096 + (1 << 20) + 4096
    assert one["parameters"] == params * 4 and one["optimizer"] == 2 * params * 4 + (1 << 20) * 8
    assert eight["parameters"] == (2 * (1 << 17) * 4096 + (1 << 17) + 4096) * 4
    assert eight["total"] < one["total"] / 6 and sum(v for k, v in one.items() if k != "total") == one["total"]
    replicas = memory_plan(cfg, 4096, world_size=8, shards=1)
    assert replicas["parameters"] == one["parameters"] and replicas["activations"] < one["activations"]


def test_plan_command(capsys):
    assert main(["plan", "--d", "576", "--expansion", "8", "--world-size", "4", "--shards", "2"]) == 0
    out = capsys.readouterr().out
    assert "4,608 features of d = 576" in out and "2 data-parallel replicas x 2 feature blocks of 2,304" in out
    assert main(["plan", "--d", "576", "--world-size", "4", "--shards", "3"]) == 2
