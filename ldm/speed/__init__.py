"""Speed switches: device, dtypes, SDPA kernel scopes, precision and compilation (``runtime``); fused projections,
channels_last and int8 (``optimize``); model CPU offload (``offload``). Imports the model and weights I/O only."""
