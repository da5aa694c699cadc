"""Pure tensor math: spectral functions with a stable backward, SPD metrics and their means.

No ``nn.Module``, no buffers, no ``torch.distributed``. Import as ``from manifoldnorm import functional as mf``.
"""

from .polar import project_so
from .so3 import (
    check_rotation,
    distance_so3,
    geodesic_so3,
    left_mul,
    mean_so3,
    mean_so3_chordal,
    project_so3,
    so3_exp,
    so3_exp_ref,
    so3_hat,
    so3_log,
    so3_log_ref,
    so3_vee,
)
from .spd import METRICS, check_metric, distance, expmap, geodesic, logmap, mean
from .spd_aim import (
    KarcherConvergenceError,
    KarcherConvergenceWarning,
    congruence,
    distance_aim,
    expmap_aim,
    geodesic_aim,
    logmap_aim,
    mean_aim,
    segment_mean_aim,
)
from .spd_bw import (
    distance_bw,
    distance_gbw,
    expmap_bw,
    geodesic_bw,
    logmap_bw,
    lyapunov_solve,
    mean_bw,
    sqdistance_bw,
    transport_bw_from_identity,
    transport_bw_to_identity,
)
from .spd_pullback import (
    cholesky_exp,
    cholesky_exp_ref,
    cholesky_log,
    cholesky_log_ref,
    distance_lcm,
    distance_lem,
    geodesic_lcm,
    geodesic_lem,
    mean_lcm,
    mean_lem,
)
from .spectral import (
    SymEig,
    sym,
    sym_eig,
    sym_expm,
    sym_funcm,
    sym_invm,
    sym_invsqrtm,
    sym_logm,
    sym_powm,
    sym_reeig,
    sym_reeig_logm,
    sym_sqrtm,
    sym_sqrtm_invsqrtm,
)
from .spectral_ref import (
    sym_expm_ref,
    sym_funcm_ref,
    sym_invsqrtm_ref,
    sym_logm_ref,
    sym_powm_ref,
    sym_reeig_ref,
    sym_sqrtm_ref,
)
from .validation import check_finite, check_spd, check_square, check_symmetric, strict_inputs

__all__ = [
    "distance_bw", "distance_gbw", "expmap_bw", "geodesic_bw", "logmap_bw", "lyapunov_solve", "mean_bw",
    "sqdistance_bw", "transport_bw_from_identity", "transport_bw_to_identity",
    "project_so", "check_rotation", "distance_so3", "geodesic_so3", "left_mul", "mean_so3", "mean_so3_chordal",
    "project_so3", "so3_exp", "so3_exp_ref", "so3_hat", "so3_log", "so3_log_ref", "so3_vee",
    "METRICS", "check_metric", "distance", "expmap", "geodesic", "logmap", "mean",
    "congruence", "distance_aim", "expmap_aim", "geodesic_aim", "logmap_aim", "mean_aim", "segment_mean_aim",
    "KarcherConvergenceError",
    "KarcherConvergenceWarning",
    "cholesky_exp", "cholesky_exp_ref", "cholesky_log", "cholesky_log_ref", "distance_lcm", "distance_lem",
    "geodesic_lcm", "geodesic_lem",
    "mean_lcm", "mean_lem",
    "SymEig", "sym", "sym_eig", "sym_expm", "sym_expm_ref", "sym_funcm", "sym_funcm_ref", "sym_invm", "sym_invsqrtm",
    "sym_invsqrtm_ref", "sym_logm", "sym_logm_ref", "sym_powm", "sym_powm_ref", "sym_reeig", "sym_reeig_logm",
    "sym_reeig_ref", "sym_sqrtm", "sym_sqrtm_invsqrtm", "sym_sqrtm_ref",
    "check_finite", "check_spd", "check_square", "check_symmetric", "strict_inputs",
]
