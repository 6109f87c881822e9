"""Building blocks shared by every model family; the hot math lives in `services.llm.kernels`."""
