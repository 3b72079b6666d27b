"""Accuracy on a real bundled dataset (scikit-learn's digits): a CNN with half of its filters physically
removed and fine-tuned stays within 1 point of the dense model."""
import pytest
import torch

pytest.importorskip("sklearn")

from pruning.channels import prune_channels  # noqa: E402
from test_prune_weights import one_thread  # noqa: E402,F401
from sparsekernels.examples.digits import DigitsCNN, evaluate_accuracy, load_digits_data, train_classifier  # noqa: E402


# the suite shares a 2-core machine: intra-op threads only add contention at these tiny sizes
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_half_filters_removed_and_finetuned_within_one_point():
    from pruning.training import finetune

    torch.manual_seed(0)
    data = load_digits_data()
    dense = DigitsCNN(width=16)
    train_classifier(dense, data, epochs=12, lr=3e-3, progress=False)
    dense_acc = evaluate_accuracy(dense, data)
    assert dense_acc > 95.0

    x = data.test.tensors[0][:4]
    pruned, report = prune_channels(dense, x, ratio=0.5, return_report=True, progress=False)
    convs = [m for m in pruned.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32]  # half of 16, 32, 64, 64
    assert pruned.classifier[1].out_features == 32
    assert report.mac_reduction > 3.0  # both sides of most convs halved

    finetune(pruned, data.train_loader(64), epochs=6, lr=2e-3, progress=False, seed=0)
    pruned_acc = evaluate_accuracy(pruned, data)
    assert pruned_acc >= dense_acc - 1.0, f"dense {dense_acc:.2f} % -> pruned + fine-tuned {pruned_acc:.2f} %"
