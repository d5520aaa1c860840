"""A1111/Forge face: the sdtune tab, its settings, and generation paused while an sdtune job holds the GPU.

Runs at every WebUI start and "Reload UI", so it only wires; lib_sdtune/webui/a1111_host.py does the work.
"""

from modules import script_callbacks, shared  # the WebUI's own modules

from lib_sdtune.webui.a1111_host import release_webui_host, webui_host
from lib_sdtune.webui.settings import SETTINGS

host = webui_host()
host.install_guard()  # generation asks first whether an sdtune job holds the GPU


def on_ui_settings():
    host.add_settings()


def on_ui_tabs():
    from lib_sdtune.webui.app import build_blocks

    ctx = host.context()
    for setting in SETTINGS:
        if setting.key in shared.opts.data_labels:
            shared.opts.onchange(setting.key, lambda: host.update_context(ctx), call=False)
    return [(build_blocks(ctx), "sdtune", "sdtune")]


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_script_unloaded(release_webui_host)
