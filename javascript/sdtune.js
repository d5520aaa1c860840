// sdtune tab (A1111/Forge): refresh the checkpoint list whenever the tab is opened, so models
// added since the page loaded appear without pressing "Refresh".
onUiTabChange(function () {
    const tab = get_uiCurrentTab();
    if (!tab || tab.textContent.trim() !== "sdtune") return;
    const button = gradioApp().querySelector("#sdtune_model_refresh");
    if (button) button.click();
});
