// Shows the text report an sdtune node returns (ui.text) in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
    name: "sdtune.Report",
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
            this.setSize?.(this.computeSize());
        };
    },
});
