"""Sample from trained LoRA / Flat-LoRA adapters side by side, in the browser.

    python app.py                                   # toy:sd + outputs/demo (after the README's main job)
    python app.py --base stabilityai/stable-diffusion-xl-base-1.0 --adapters runs/ --port 7861
    python app.py --help                            # every flag

Binds 127.0.0.1 unless `--host` says otherwise. The page and its logic live in
`flatlora_diffusion.app_ui` and `flatlora_diffusion.app_studio`.
"""

import sys

from flatlora_diffusion.app_ui import main

if __name__ == "__main__":
    sys.exit(main())
