// sdtune tab: keyboard shortcuts of the tag editor, and fresh model lists when the tab is opened.
// Loaded by A1111/Forge (javascript/*.js) and, in the standalone app, as a <head> script. It only looks
// elements up by our elem_ids and clicks our own buttons, so it works with gradio 3.41 to 6.
(function () {
    "use strict";

    function appRoot() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function clickButton(id) {
        const button = appRoot().querySelector("#" + id);
        if (!button || button.disabled) return false;
        button.click();
        return true;
    }

    function visible(id) {
        const el = appRoot().querySelector("#" + id);
        return !!el && el.offsetParent !== null;
    }

    function isTextField(el) {
        return !!el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.isContentEditable);
    }

    // Caption editor: Ctrl+Enter saves. Dataset tab, outside text fields: Ctrl+Z undo, Ctrl+Y / Ctrl+Shift+Z redo.
    document.addEventListener("keydown", function (event) {
        if (!(event.ctrlKey || event.metaKey) || event.altKey) return;
        const target = event.composedPath ? event.composedPath()[0] : event.target;
        const inCaption = target && target.closest && target.closest("#sdtune_ds_caption");
        if (event.key === "Enter" && inCaption) {
            // let gradio see the text typed last before the click reads it
            target.dispatchEvent(new Event("input", {bubbles: true}));
            if (clickButton("sdtune_ds_save")) event.preventDefault();
            return;
        }
        if (isTextField(target) || !visible("sdtune_ds_undo")) return;
        const key = event.key.toLowerCase();
        if (key === "z" && !event.shiftKey) {
            if (clickButton("sdtune_ds_undo")) event.preventDefault();
        } else if (key === "y" || (key === "z" && event.shiftKey)) {
            if (clickButton("sdtune_ds_redo")) event.preventDefault();
        }
    });

    // A1111/Forge: refresh the checkpoint and dataset lists whenever the sdtune tab is opened, so models
    // added since the page loaded appear without pressing "Refresh".
    if (typeof onUiTabChange === "function") {
        onUiTabChange(function () {
            const tab = typeof get_uiCurrentTab === "function" ? get_uiCurrentTab() : null;
            if (!tab || tab.textContent.trim() !== "sdtune") return;
            ["sdtune_model_refresh", "sdtune_train_refresh"].forEach(clickButton);
        });
    }
})();
