// Shows the latest training figures (the "sdtune.train" websocket event the Train LoRA node sends every step)
// in a read-only line on that node while it trains.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "sdtune.TrainProgress";
const WIDGET = "sdtune_progress";

function describe(d) {
    const parts = [`step ${d.step}/${d.total}`];
    if (d.epoch !== undefined) parts.push(`epoch ${d.epoch}/${d.epochs}`);
    if (d.loss !== undefined) parts.push(`loss ${Number(d.loss).toFixed(4)}`);
    if (d.avg_loss !== undefined) parts.push(`avg ${Number(d.avg_loss).toFixed(4)}`);
    if (d.lr !== undefined) parts.push(`lr ${Number(d.lr).toExponential(2)}`);
    if (d.eta_s !== undefined) parts.push(`${Math.round(d.eta_s)} s left`);
    return parts.join(" | ");
}

function showOn(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: false }], app).widget;
        if (widget.inputEl) widget.inputEl.readOnly = true;
        widget.serialize = false; // not part of the saved workflow
    }
    widget.value = text;
    node.setDirtyCanvas?.(true, false);
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) {
    app.registerExtension({
        name: EXTENSION,
        setup() {
            api.addEventListener("sdtune.train", ({ detail }) => {
                const node = app.graph?.getNodeById(Number(detail?.node));
                if (node) showOn(node, describe(detail));
            });
        },
    });
}
