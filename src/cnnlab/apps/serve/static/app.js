// The prediction page. Everything shown about a prediction is a "panel": a function called
// as panel(result, context) after each successful POST /predict, where result is the JSON
// reply and context = {file, imageUrl, info}. A new view (Grad-CAM, say) adds a <section
// class="panel"> to #panels, or creates one, and registers with cnnlab.addPanel(fn).
"use strict";

const cnnlab = (() => {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, k: 5, panels: [], imageUrl: null };

  function addPanel(render) { state.panels.push(render); }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // 1500000 -> "1.5 MB", 10000000 -> "10 MB": the server's --max-upload-mb is in these units.
  function megabytes(bytes) { return `${Number((bytes / 1e6).toFixed(1))} MB`; }

  function detailText(body, response) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return `the server answered ${response.status} ${response.statusText}`;
  }

  async function loadInfo() {
    try {
      const response = await fetch("/health");
      state.info = await response.json();
      const m = state.info.model;
      const acc = m.test_accuracy == null ? "" : `, test accuracy ${(100 * m.test_accuracy).toFixed(1)}%`;
      $("model-info").textContent = `model ${m.arch} (run ${m.run}): ${m.num_classes} classes at `
        + `${m.input_size[1]}x${m.input_size[0]} px${acc}`;
      $("limits").textContent = `Any size or format up to ${megabytes(state.info.max_upload_bytes)}; `
        + `it is resized to ${m.input_size[1]}x${m.input_size[0]}.`;
    } catch (err) {
      showError(`cannot reach the server: ${err}`);
    }
  }

  function hidePanels() {
    for (const panel of document.querySelectorAll("#panels .panel")) panel.hidden = true;
  }

  async function classify(file) {
    showError("");
    if (!file) return;
    hidePanels();             // never show the last image's answer next to a new upload
    const limit = state.info && state.info.max_upload_bytes;
    if (limit && file.size > limit) {              // refused here: nothing is sent
      let size = megabytes(file.size);
      if (size === megabytes(limit)) size = `${file.size.toLocaleString("en")} bytes`;   // not "1 MB, over 1 MB"
      showError(`${file.name} is ${size}, over this server's upload limit of ${megabytes(limit)}: `
        + "resize or compress the image and try again.");
      return;
    }
    const drop = $("drop");
    drop.classList.add("busy");
    try {
      const form = new FormData();
      form.append("file", file, file.name);
      const response = await fetch(`/predict?k=${state.k}`, { method: "POST", body: form });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        showError(detailText(body, response));
        return;
      }
      if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
      state.imageUrl = URL.createObjectURL(file);
      const context = { file, imageUrl: state.imageUrl, info: state.info };
      for (const panel of state.panels) {
        try { panel(body, context); } catch (err) { console.error("panel failed", err); }
      }
    } catch (err) {
      showError(`upload failed: ${err}`);
    } finally {
      drop.classList.remove("busy");
    }
  }

  // ---- built-in panels: the image, then the top classes with bars
  addPanel(function preview(result, context) {
    $("preview").src = context.imageUrl;
    $("image-meta").textContent = `${result.file || "image"}: ${result.width}x${result.height} px, `
      + `classified in ${(1000 * result.seconds).toFixed(0)} ms`;
    $("preview-panel").hidden = false;
  });

  addPanel(function topClasses(result) {
    const list = $("results");
    list.replaceChildren(...result.top.map((t) => {
      const item = document.createElement("li");
      item.className = "result";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = t.class;          // class names are data: never innerHTML
      label.title = t.class;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = `${(100 * t.probability).toFixed(1)}%`;
      bar.append(fill);
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = `${(100 * t.probability).toFixed(1)}%`;
      item.append(label, bar, prob);
      return item;
    }));
    $("top-panel").hidden = false;
  });

  // ---- Grad-CAM of the top class, under the bars (POST /gradcam with the same file)
  let gradcamUrl = null;
  addPanel(function gradcam(result, context) {
    const form = new FormData();
    form.append("file", context.file, context.file.name);
    const current = () => context.imageUrl === state.imageUrl;    // false once a newer upload starts
    fetch("/gradcam", { method: "POST", body: form })
      .then((response) => (response.ok && current() ? response.blob() : null))
      .then((blob) => {
        if (!blob || !current()) return;
        if (gradcamUrl) URL.revokeObjectURL(gradcamUrl);
        gradcamUrl = URL.createObjectURL(blob);
        $("gradcam").src = gradcamUrl;
        $("gradcam-meta").textContent = `Grad-CAM for ${result.top[0].class}: red marks the regions `
          + "that raised its score.";
        $("gradcam-panel").hidden = false;
      })
      .catch((err) => console.warn("Grad-CAM unavailable", err));   // the prediction stands alone
  });

  // ---- input: file picker, drag and drop, paste
  function wire() {
    const drop = $("drop");
    $("file").addEventListener("change", (e) => classify(e.target.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    for (const name of ["dragleave", "drop"]) {
      drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
    }
    drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
    document.addEventListener("paste", (e) => {
      const item = [...e.clipboardData.items].find((i) => i.kind === "file");
      if (item) classify(item.getAsFile());
    });
    loadInfo();
  }

  document.addEventListener("DOMContentLoaded", wire);
  return { addPanel, classify, hidePanels, showError, state };
})();
