// Site behaviour for the MTL catalogue: BibTeX copy buttons and the Browse table's
// filters and sorting. Plain JavaScript, no framework, nothing loaded from the network.
(function () {
  "use strict";

  // ---- Copy buttons -------------------------------------------------------------
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Fallback for pages served over plain http on another host: a hidden textarea.
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      var ok = document.execCommand("copy");
      document.body.removeChild(area);
      if (ok) { resolve(); } else { reject(new Error("copy command refused")); }
    });
  }

  function setupCopyButtons() {
    document.querySelectorAll("button.mtl-copy").forEach(function (button) {
      button.addEventListener("click", function () {
        var source = document.getElementById(button.getAttribute("data-copy-target"));
        var status = button.parentNode.querySelector(".mtl-copy-status");
        if (!source) { return; }
        copyText(source.textContent).then(function () {
          if (status) { status.textContent = "Copied to the clipboard."; }
          button.setAttribute("data-copied", "true");
        }, function () {
          if (status) { status.textContent = "Copy failed: select the text and copy it by hand."; }
        });
      });
    });
  }

  // ---- Browse table -------------------------------------------------------------
  var FIELDS = ["text", "topic", "from", "to", "venue", "code", "impl"];

  function readState(form) {
    var state = {};
    FIELDS.forEach(function (name) {
      var input = form.elements[name];
      if (!input) { return; }
      state[name] = input.type === "checkbox" ? (input.checked ? "1" : "") : input.value.trim();
    });
    return state;
  }

  function writeState(form, params) {
    FIELDS.forEach(function (name) {
      var input = form.elements[name];
      if (!input) { return; }
      var value = params.get(name) || "";
      if (input.type === "checkbox") {
        input.checked = value === "1";
      } else if (input.tagName === "SELECT") {
        var known = Array.prototype.some.call(input.options, function (o) { return o.value === value; });
        input.value = known ? value : "";
      } else {
        input.value = value;
      }
    });
  }

  // Letters that carry no separable accent, spelled as people type them without one (Søgaard, Łukasz).
  var PLAIN = { "ø": "o", "ł": "l", "đ": "d", "ð": "d", "ı": "i", "æ": "ae", "œ": "oe", "ß": "ss" };

  // The text filter compares folded text, so "daume" finds Daumé and "vulic" Vulić, and the other way round.
  function fold(text) {
    return text.normalize("NFKD").replace(/\p{M}/gu, "").toLowerCase()
      .replace(/[øłđðıæœß]/g, function (c) { return PLAIN[c]; });
  }

  var foldedText = new WeakMap();  // row -> its folded data-text, folded once

  function rowText(row) {
    if (!foldedText.has(row)) { foldedText.set(row, fold(row.dataset.text)); }
    return foldedText.get(row);
  }

  function rowMatches(row, state) {
    var year = Number(row.dataset.year);
    if (state.text) {
      var words = fold(state.text).split(/\s+/), text = rowText(row);
      for (var i = 0; i < words.length; i++) {
        if (text.indexOf(words[i]) === -1) { return false; }
      }
    }
    if (state.topic && (" " + row.dataset.topics + " ").indexOf(" " + state.topic + " ") === -1) { return false; }
    if (state.from && year < Number(state.from)) { return false; }
    if (state.to && year > Number(state.to)) { return false; }
    if (state.venue && row.dataset.venue !== state.venue) { return false; }
    if (state.code && row.dataset.code !== "1") { return false; }
    if (state.impl && row.dataset.impl !== "1") { return false; }
    return true;
  }

  function compareRows(key, direction) {
    var numeric = key === "year" || key === "code" || key === "impl";
    return function (a, b) {
      var x = a.dataset[key] || "", y = b.dataset[key] || "";
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      if (order === 0) { order = a.dataset.title.localeCompare(b.dataset.title); return order; }
      return direction === "ascending" ? order : -order;
    };
  }

  function setupBrowse() {
    var table = document.getElementById("mtl-browse");
    var form = document.getElementById("mtl-filters");
    var count = document.getElementById("mtl-count");
    if (!table || !form) { return; }
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sort = { key: "", direction: "" };

    function apply(updateUrl) {
      var state = readState(form), shown = 0;
      rows.forEach(function (row) {
        var match = rowMatches(row, state);
        row.hidden = !match;
        if (match) { shown += 1; }
      });
      count.textContent = shown === rows.length ? rows.length + " papers"
        : "Showing " + shown + " of " + rows.length + " papers";
      if (updateUrl) {
        var params = new URLSearchParams();
        FIELDS.forEach(function (name) { if (state[name]) { params.set(name, state[name]); } });
        if (sort.key) { params.set("sort", sort.key); params.set("order", sort.direction === "ascending" ? "asc" : "desc"); }
        var query = params.toString();
        history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
      }
    }

    function applySort(key, direction) {
      sort = { key: key, direction: direction };
      table.querySelectorAll("th[aria-sort]").forEach(function (th) {
        var button = th.querySelector("button[data-sort]");
        th.setAttribute("aria-sort", button && button.dataset.sort === key ? direction : "none");
      });
      rows.slice().sort(compareRows(key, direction)).forEach(function (row) { body.appendChild(row); });
    }

    table.querySelectorAll("button[data-sort]").forEach(function (button) {
      button.addEventListener("click", function () {
        var key = button.dataset.sort;
        var current = button.parentNode.getAttribute("aria-sort");
        var direction = current === "ascending" ? "descending"
          : current === "descending" ? "ascending" : (key === "year" ? "descending" : "ascending");
        applySort(key, direction);
        apply(true);
      });
    });
    form.addEventListener("input", function () { apply(true); });
    form.addEventListener("change", function () { apply(true); });
    form.addEventListener("submit", function (event) { event.preventDefault(); });
    form.addEventListener("reset", function () { setTimeout(function () { apply(true); }, 0); });

    var params = new URLSearchParams(location.search);
    writeState(form, params);
    var key = (params.get("sort") || "").replace(/[^a-z]/g, "");
    if (key && table.querySelector('button[data-sort="' + key + '"]')) {
      applySort(key, params.get("order") === "asc" ? "ascending" : "descending");
    }
    apply(false);
    table.setAttribute("data-ready", "true");
  }

  // The theme's search overlay is a dialog without a name (axe: aria-dialog-name).
  function nameSearchDialog() {
    var dialog = document.querySelector(".md-search[role='dialog']");
    if (dialog && !dialog.hasAttribute("aria-label")) { dialog.setAttribute("aria-label", "Search"); }
  }

  function start() {
    nameSearchDialog();
    setupCopyButtons();
    setupBrowse();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
