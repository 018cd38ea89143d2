"""In a notebook the ProgressBar is one HTML table of the history rows redrawn in place (and SamplePredictions one
HTML table, ShowGraph one image); checked by executing a small notebook with nbclient and reading the cells' stored outputs."""
import re

import nbformat
import pytest
from nbclient import NotebookClient

from looplab.display import in_notebook

SETUP = """
import torch
from torch import nn
from torch.nn import functional as F
from looplab import Learner, DataLoaders, ProgressBar, SamplePredictions
torch.manual_seed(0)
x = torch.randn(200, 4); y = (x[:, 0] > 0).long()
dls = DataLoaders.from_tensors(x, y, valid_pct=0.2, bs=16, seed=0)
learn = Learner(nn.Linear(4, 2), dls, F.cross_entropy)
"""


def body_rows(markup: str) -> list[str]:
    """The `<tr>` rows of the table's body."""
    body = re.search(r"<tbody>(.*?)</tbody>", markup, re.DOTALL)
    return re.findall(r"<tr>(.*?)</tr>", body.group(1), re.DOTALL) if body else []


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every cell's outputs, by the cell's first line."""
    cells = [SETUP,
             "# fit\nlearn.fit(3)",
             ("# text\n"
              "Learner(nn.Linear(4, 2), dls, F.cross_entropy, progress=False, cbs=[ProgressBar(html=False)]).fit(2)"),
             ("# samples\nsamples = SamplePredictions([0, 5])\nLearner(nn.Linear(4, 2), dls, F.cross_entropy, "
              "progress=False, cbs=[samples]).fit(2)"),
             ("# graph\nfrom looplab import ShowGraph\nLearner(nn.Linear(4, 2), dls, F.cross_entropy, "
              "progress=False, cbs=[ShowGraph()]).fit(2)\nimport os\nos.path.exists('loss.png')"),
             "# detect\nfrom looplab.display import in_notebook\nin_notebook()"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.strip()) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}}).execute()
    return {cell.source.splitlines()[0]: cell.outputs for cell in nb.cells}


def test_a_notebook_fit_ends_with_one_html_table_of_its_epochs(executed):
    outputs = executed["# fit"]
    assert len(outputs) == 1  # one display, redrawn in place: no stream of text, no second output
    (out,) = outputs
    assert out.output_type == "display_data" and "text/html" in out.data
    markup = out.data["text/html"]
    rows = body_rows(markup)
    assert len(rows) == 3
    assert [re.search(r"<td>(.*?)</td>", r).group(1) for r in rows] == ["0", "1", "2"]  # the epoch column
    assert "<th>train_loss</th>" in markup and "<th>valid_loss</th>" in markup
    assert "<progress" not in markup  # the bar is gone once the fit ended


def test_html_false_keeps_the_text_output_in_a_notebook(executed):
    outputs = executed["# text"]
    assert all(o.output_type == "stream" for o in outputs)
    text = "".join(o.text for o in outputs)
    assert "train_loss" in text and "valid_loss" in text


def test_sample_predictions_show_one_html_table_in_place(executed):
    outputs = executed["# samples"]
    assert len(outputs) == 1 and outputs[0].output_type == "display_data"
    markup = outputs[0].data["text/html"]
    assert "predictions at step 20" in markup  # the second validation's table replaced the first
    assert len(body_rows(markup)) == 2


def test_show_graph_redraws_one_image_in_place(executed):
    outputs = executed["# graph"]
    assert [o.output_type for o in outputs] == ["display_data", "execute_result"]
    assert "image/png" in outputs[0].data  # the second row's redraw replaced the first
    assert outputs[1].data["text/plain"] == "False"  # no PNG file written in a notebook


def test_a_script_is_not_a_notebook():
    assert not in_notebook()


def test_the_kernel_is_detected_as_a_notebook(executed):
    assert executed["# detect"][0].data["text/plain"] == "True"
