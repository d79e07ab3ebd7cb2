"""Linear algebra of activations: the streaming covariance accumulator and what its eigen-decomposition gives
(singular values, principal basis, active subspace, effective rank). Imports nothing of ranklens but errors."""
