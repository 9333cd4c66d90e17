import pytest

from trl_tip.testing import tiny_tokenizer
from trl_tip.trainer import tip_trainer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def loss_calls(monkeypatch):
    """Records every call of the masked loss inside the trainer: its inputs (copied before the optimizer steps) and
    its loss."""
    calls = []
    original = tip_trainer.masked_gjsd_loss

    def recording(student_hidden, teacher_hidden, student_head, teacher_head, selected_mask, **kwargs):
        loss, loss_sum, num_selected = original(
            student_hidden, teacher_hidden, student_head, teacher_head, selected_mask, **kwargs
        )
        copy = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
        copy.update({"student_head": student_head, "teacher_head": teacher_head, "selected": selected_mask})
        copy = {name: value.detach().clone() for name, value in copy.items()}
        copy.update(kwargs, loss=loss.detach().clone())
        calls.append(copy)
        return loss, loss_sum, num_selected

    monkeypatch.setattr(tip_trainer, "masked_gjsd_loss", recording)
    return calls
