/* Adapter hub web UI: copy buttons and the upload page (drag and drop,
 * progress bar, server errors next to their field). Everything else is
 * server-rendered HTML with htmx.
 *
 * Vendored beside this file: htmx.min.js = htmx.org 2.0.11 from the npm
 * registry (`npm pack htmx.org@2.0.11`, dist/htmx.min.js, license 0BSD,
 * sha256 d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717).
 */
(function () {
  "use strict";

  // --- copy buttons --------------------------------------------------------------------
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain http (a laptop hub): a hidden textarea and execCommand.
    var ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.appendChild(ta);
    ta.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(ta);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy failed"));
  }

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest && ev.target.closest("button.copy");
    if (!btn) return;
    var src = document.getElementById(btn.dataset.copy);
    if (!src) return;
    copyText(src.innerText.trim()).then(function () {
      btn.textContent = "Copied";
    }, function () {
      btn.textContent = "Select and copy";
    });
    setTimeout(function () { btn.textContent = "Copy"; }, 2000);
  });

  // --- upload ------------------------------------------------------------------------------
  var FILE_FIELDS = ["files", "adapter_config.json", "adapter_model.safetensors"];
  var FORM_FIELDS = ["name", "owner", "base_model", "visibility", "tags", "description", "seeds", "files"];

  // Which form field an API error belongs to (mirrors frontend.views.upload_error_field).
  function fieldFor(field) {
    if (!field) return "form";
    if (FILE_FIELDS.indexOf(field) >= 0 || /\.(safetensors|json|bin|pt)$/.test(field)) return "files";
    return FORM_FIELDS.indexOf(field) >= 0 ? field : "form";
  }

  function humanSize(n) {
    var units = ["bytes", "KB", "MB", "GB", "TB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  // Files of a drop: plain files, or the top level of a dropped folder.
  // Entries must be taken during the event: the DataTransfer empties after it.
  function droppedFiles(dt) {
    var entries = [];
    var items = dt.items ? Array.prototype.slice.call(dt.items) : [];
    items.forEach(function (item) {
      var entry = item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry) entries.push(entry);
    });
    var plain = Array.prototype.slice.call(dt.files || []);
    if (!entries.some(function (e) { return e.isDirectory; })) return Promise.resolve(plain);
    return Promise.all(entries.map(function (entry) {
      if (entry.isFile) return new Promise(function (ok, fail) { entry.file(function (f) { ok([f]); }, fail); });
      return readDirectory(entry);
    })).then(function (lists) { return [].concat.apply([], lists); });
  }

  function readDirectory(dir) {
    var reader = dir.createReader();
    var out = [];
    return new Promise(function (resolve, reject) {
      (function next() {
        reader.readEntries(function (batch) {
          if (!batch.length) {
            Promise.all(out).then(resolve, reject);
            return;
          }
          batch.forEach(function (e) {
            // Top-level files only: a PEFT folder keeps its adapter there.
            if (e.isFile && e.name.charAt(0) !== ".") {
              out.push(new Promise(function (ok, fail) { e.file(ok, fail); }));
            }
          });
          next();
        }, reject);
      })();
    });
  }

  function initUpload(form) {
    var input = form.querySelector("#id_files");
    var zone = form.querySelector("#dropzone");
    var list = form.querySelector("#file-list");
    var clear = form.querySelector("#clear-files");
    var box = form.querySelector("#upload-progress-box");
    var bar = form.querySelector("#upload-progress");
    var pct = form.querySelector("#upload-percent");
    var status = form.querySelector("#upload-status");
    var submit = form.querySelector("#upload-submit");
    var busy = false;

    function control(field) {
      if (field === "files") return input;
      if (field === "visibility") return form.querySelector("input[name=visibility]");
      return form.querySelector("[name=" + field + "]");
    }

    function clearErrors() {
      Array.prototype.forEach.call(form.querySelectorAll("p.error"), function (p) {
        p.textContent = "";
        p.hidden = true;
      });
      Array.prototype.forEach.call(form.querySelectorAll("[aria-invalid]"), function (el) {
        el.removeAttribute("aria-invalid");
      });
    }

    function showError(field, message) {
      var p = form.querySelector("#err-" + field) || form.querySelector("#err-form");
      p.textContent = p.textContent ? p.textContent + " " + message : message;
      p.hidden = false;
      var el = control(field);
      if (el) el.setAttribute("aria-invalid", "true");
      return el || p;
    }

    function render() {
      list.innerHTML = "";
      Array.prototype.forEach.call(input.files, function (f) {
        var li = document.createElement("li");
        li.textContent = f.name + " (" + humanSize(f.size) + ")";
        list.appendChild(li);
      });
      zone.dataset.state = input.files.length ? "chosen" : "empty";
      clear.hidden = !input.files.length;
    }

    // One list of files, kept in the real input so the no-JS path and this one agree.
    function setFiles(files) {
      var byName = {};
      files.forEach(function (f) { byName[f.name] = f; }); // a later file replaces one of the same name
      var dt = new DataTransfer();
      Object.keys(byName).sort().forEach(function (k) { dt.items.add(byName[k]); });
      input.files = dt.files;
      render();
    }

    input.addEventListener("change", render);
    clear.addEventListener("click", function () { input.value = ""; render(); input.focus(); });
    ["dragenter", "dragover"].forEach(function (t) {
      zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "dragend"].forEach(function (t) {
      zone.addEventListener(t, function () { zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (e) {
      e.preventDefault();
      zone.classList.remove("over");
      var current = Array.prototype.slice.call(input.files);
      droppedFiles(e.dataTransfer).then(function (files) {
        setFiles(current.concat(files));
        status.textContent = files.length + " file" + (files.length === 1 ? "" : "s") + " added.";
      }, function () {
        showError("files", "Could not read the dropped files; choose them with the button instead.");
      });
    });

    function setProgress(value) {
      var v = Math.max(0, Math.min(100, Math.round(value)));
      bar.value = v;
      bar.textContent = v + "%";
      pct.textContent = v + "%";
    }

    window.addEventListener("beforeunload", function (e) {
      if (busy) { e.preventDefault(); e.returnValue = ""; }
    });

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      if (busy) return;
      clearErrors();
      status.textContent = "";
      if (!input.files.length) {
        showError("files", "Choose the adapter's files (adapter_config.json and adapter_model.safetensors).").focus();
        return;
      }
      var owner = form.elements.owner.value;
      var name = form.elements.name.value.trim();
      var fd = new FormData();
      fd.append("name", owner + "/" + name);
      fd.append("base_model", form.elements.base_model.value.trim());
      fd.append("visibility", form.querySelector("input[name=visibility]:checked").value);
      fd.append("tags", form.elements.tags.value);
      fd.append("description", form.elements.description.value);
      Array.prototype.forEach.call(input.files, function (f) { fd.append("files", f, f.name); });
      var seeds = form.elements.seeds.files;
      if (seeds.length) fd.append("seeds", seeds[0], seeds[0].name);

      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.dataset.api);
      xhr.setRequestHeader("X-CSRFToken", form.elements.csrfmiddlewaretoken.value);
      xhr.setRequestHeader("Accept", "application/json");
      // No xhr.timeout: a large adapter may take minutes; the server streams it to disk.
      xhr.upload.addEventListener("progress", function (ev) {
        if (ev.lengthComputable) setProgress(100 * ev.loaded / ev.total);
      });
      xhr.upload.addEventListener("load", function () {
        setProgress(100);
        status.textContent = "Uploaded; checking the files against the base model…";
      });
      xhr.addEventListener("load", function () {
        busy = false;
        submit.disabled = false;
        var body = {};
        try { body = JSON.parse(xhr.responseText || "{}"); } catch (err) { body = {}; }
        if (xhr.status === 201) {
          setProgress(100);
          form.dataset.state = "done";
          var url = form.dataset.adapterUrl + owner + "/" + name + "/";
          status.innerHTML = "";
          status.appendChild(document.createTextNode("Uploaded " + owner + "/" + name + ". "));
          var a = document.createElement("a");
          a.href = url;
          a.id = "open-adapter";
          a.textContent = "Open its page";
          status.appendChild(a);
          a.focus();
          return;
        }
        form.dataset.state = "error";
        box.hidden = true;
        setProgress(0);
        status.textContent = "The hub refused the upload; nothing was stored.";
        var first = null;
        if (body.fields && typeof body.fields === "object") {
          Object.keys(body.fields).forEach(function (k) {
            var msg = [].concat(body.fields[k]).join(" ");
            var el = showError(fieldFor(k), msg);
            first = first || el;
          });
        } else {
          var field = body.field;
          if (!field && xhr.status === 409) field = "name";
          if (!field && xhr.status === 403) field = "owner";
          if (!field && xhr.status === 413) field = "files";
          first = showError(fieldFor(field), body.detail || ("Upload failed (HTTP " + xhr.status + ")."));
        }
        if (first && first.focus) first.focus();
      });
      xhr.addEventListener("error", function () {
        busy = false;
        submit.disabled = false;
        box.hidden = true;
        form.dataset.state = "error";
        showError("form", "The connection failed during the upload; nothing was stored. Try again.");
      });
      busy = true;
      submit.disabled = true;
      form.dataset.state = "uploading";
      box.hidden = false;
      setProgress(0);
      status.textContent = "Uploading…";
      xhr.send(fd);
    });
    render();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("upload-form");
    if (form && window.DataTransfer && window.XMLHttpRequest) initUpload(form);
  });
})();
