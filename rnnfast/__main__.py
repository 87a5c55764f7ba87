"""``python -m rnnfast``: print how the extension was built."""

import torch

import rnnfast

if __name__ == "__main__":
    info = rnnfast.build_info()
    info["torch_version_running"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
