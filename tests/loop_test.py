"""LoopState: what checkpoints hold of the loop, including checkpoints written before it existed."""

from tfllm.loop import LoopState


def test_state_round_trips_through_a_checkpoint_record():
    state = LoopState(step=7, samples=112, epoch=1, tokens_seen=7168.0, scores={"val_loss": 2.5})
    assert LoopState.from_checkpoint({**state.to_dict(), "world_size": 2}, 16) == state


def test_older_checkpoints_derive_the_data_position():
    pretrain = LoopState.from_checkpoint({"step": 10, "epoch": 0, "tokens_seen": 1.0, "global_batch": 24}, 16)
    assert pretrain.samples == 240
    finetune = LoopState.from_checkpoint({"step": 4, "best_accuracy": 0.75, "evals_without_gain": 1}, 16)
    assert finetune.samples == 64 and finetune.scores == {"best_accuracy": 0.75, "evals_without_gain": 1}
