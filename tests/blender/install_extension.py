"""Install the built extension zip the way a user does (Preferences > Get Extensions > Install from Disk).

    BLENDER_USER_RESOURCES=DIR python install_extension.py realfusion-X.zip REPORT.json

Run with a throw-away BLENDER_USER_RESOURCES so nothing lands in the real user folder.
"""

import json
import sys

import bpy


def main(zip_path: str, report_path: str) -> int:
    assert "BLENDER_USER_RESOURCES" in __import__("os").environ, "refusing to install into the real user folder"
    result = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                                      enable_on_install=True)
    assert result == {'FINISHED'}, result
    module = next((name for name in bpy.context.preferences.addons.keys() if name.endswith(".realfusion")), "")
    assert module, list(bpy.context.preferences.addons.keys())
    report = {
        "module": module,
        "panel": hasattr(bpy.types, "VIEW3D_PT_realfusion"),
        "scene_property": hasattr(bpy.context.scene, "realfusion"),
        "preferences_url": bpy.context.preferences.addons[module].preferences.server_url,
    }
    import addon_utils

    addon_utils.disable(module, default_set=True)
    report["unregistered"] = not hasattr(bpy.types, "VIEW3D_PT_realfusion") and not hasattr(bpy.types.Scene,
                                                                                               "realfusion")
    with open(report_path, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
