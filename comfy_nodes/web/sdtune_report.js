// Shows the text report an sdtune node returns (ui.text) in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "sdtune.Report";

if (!app.extensions?.some((e) => e.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (!nodeData.name.startsWith("Sdtune")) return;
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const text = message?.text;
                if (!text) return;
                let widget = this.widgets?.find((w) => w.name === "sdtune_report");
                if (!widget) {
                    widget = ComfyWidgets.STRING(this, "sdtune_report", ["STRING", { multiline: true }], app).widget;
                    widget.inputEl.readOnly = true;
                    widget.serialize = false;
                }
                widget.value = Array.isArray(text) ? text.join("\n") : String(text);
                // grow (never shrink) the node so the whole report is readable
                const min = this.computeSize();
                this.setSize?.([Math.max(this.size[0], 560, min[0]), Math.max(this.size[1], min[1] + 160)]);
            };
        },
    });
}
