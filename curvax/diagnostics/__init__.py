"""Cockpit-style training diagnostics (Dangel, thesis, Ch. 7 and App. C).

Every instrument is a pure, jittable function of the quantities it needs
(per-example gradients or their reductions, diagonal curvature, losses, slopes);
`monitor` wraps an optax optimizer and computes a chosen set of them on tracked
steps; `record` and `dashboard` turn its state into JSON records and a PNG.
"""

from curvax.diagnostics.step_quality import alpha, alpha_from_fit, sample_variance
from curvax.diagnostics.curvature import (
    hessian_trace, layer_traces, tic_diag, tic_trace, top_eigenvalue)
from curvax.diagnostics.dashboard import dashboard, dashboard_panels
from curvax.diagnostics.gradient_tests import (
    INNER_TEST_THRESHOLD, NORM_TEST_THRESHOLD, ORTHO_TEST_THRESHOLD, gram_statistics,
    inner_test, norm_test, ortho_test)
from curvax.diagnostics.histograms import (
    bin_edges, counts_1d, counts_1d_outer, counts_2d, counts_2d_outer, gradient_histogram,
    gradient_parameter_histogram, layer_gradient_histograms)
from curvax.diagnostics.monitor import (
    BUSINESS, ECONOMY, FULL, INSTRUMENTS, PRESETS, MonitorState, is_scheduled, monitor)
from curvax.diagnostics.noise import cabs, early_stopping, mean_gsnr
from curvax.diagnostics.norms import (
    distance, global_norm_from_layers, gradient_norm, layer_norms, update_size)
from curvax.diagnostics.records import find_state, merge, record
from curvax.diagnostics.schedules import linear_schedule, log_schedule, log_steps

__all__ = [
    "BUSINESS", "ECONOMY", "FULL", "INNER_TEST_THRESHOLD", "INSTRUMENTS", "MonitorState",
    "NORM_TEST_THRESHOLD", "ORTHO_TEST_THRESHOLD", "PRESETS", "alpha", "alpha_from_fit",
    "bin_edges", "cabs", "counts_1d", "counts_1d_outer", "counts_2d", "counts_2d_outer",
    "dashboard", "dashboard_panels", "distance", "early_stopping", "find_state",
    "global_norm_from_layers", "gradient_histogram", "gradient_norm",
    "gradient_parameter_histogram", "gram_statistics", "hessian_trace", "inner_test",
    "is_scheduled",
    "layer_gradient_histograms", "layer_norms", "layer_traces", "linear_schedule",
    "log_schedule", "log_steps", "mean_gsnr", "merge", "monitor", "norm_test", "ortho_test",
    "record", "sample_variance", "tic_diag", "tic_trace", "top_eigenvalue", "update_size",
]
