/* The report's behaviour: draw the plots from the embedded figure JSON, switch
   the source x target heatmap, sort and filter the breakdown tables. */
(function () {
  "use strict";

  var payload = JSON.parse(document.getElementById("report-data").textContent);
  var config = { displaylogo: false, responsive: true };

  function draw(id, figure) {
    Plotly.react(id, figure.data, figure.layout, config);
  }

  Object.keys(payload.plots).forEach(function (id) {
    draw(id, payload.plots[id]);
  });

  /* Heatmap: one figure per (method, shot setting, metric), chosen by three selects. */
  var heatmapSelects = Array.prototype.slice.call(document.querySelectorAll("select[data-heatmap]"));
  function drawHeatmap() {
    var key = ["method", "shot", "metric"].map(function (name) {
      return document.querySelector('select[data-heatmap="' + name + '"]').value;
    }).join("|");
    draw("plot-heatmap", payload.heatmaps[key]);
  }
  if (heatmapSelects.length > 0) {
    heatmapSelects.forEach(function (select) { select.addEventListener("change", drawHeatmap); });
    drawHeatmap();
  }

  /* Sortable tables: numeric cells carry data-sort; an empty data-sort is a
     missing value and always goes last. Numbers sort high-to-low first. */
  function cellKey(cell) {
    var raw = cell.getAttribute("data-sort");
    if (raw === null) { return { missing: false, text: cell.textContent.trim().toLowerCase() }; }
    if (raw === "") { return { missing: true }; }
    return { missing: false, number: parseFloat(raw) };
  }

  function compare(a, b) {
    if (a.number !== undefined && b.number !== undefined) { return a.number - b.number; }
    var x = a.text !== undefined ? a.text : String(a.number);
    var y = b.text !== undefined ? b.text : String(b.number);
    return x < y ? -1 : (x > y ? 1 : 0);
  }

  function sortTable(table, index, th) {
    var headers = table.tHead.rows[0].cells;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.length > 0 && rows[0].cells[index].hasAttribute("data-sort");
    var current = th.getAttribute("aria-sort");
    var descending = current ? current === "ascending" : numeric;
    Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    rows.sort(function (r1, r2) {
      var a = cellKey(r1.cells[index]);
      var b = cellKey(r2.cells[index]);
      if (a.missing || b.missing) { return (a.missing ? 1 : 0) - (b.missing ? 1 : 0); }
      var order = compare(a, b);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = th.textContent;
      button.title = "sort by this column";
      th.textContent = "";
      th.appendChild(button);
      button.addEventListener("click", function () { sortTable(table, index, th); });
    });
  });

  /* Row filters: each select keeps the rows whose data-<attr> equals its value; the search box
     keeps the rows whose data-text (target, category) contains its words. */
  function applyFilters(tableId) {
    var filters = Array.prototype.slice.call(
      document.querySelectorAll('select.row-filter[data-table="' + tableId + '"]'));
    var search = document.querySelector('input.text-filter[data-table="' + tableId + '"]');
    var words = search ? search.value.toLowerCase().split(/\s+/).filter(Boolean) : [];
    Array.prototype.forEach.call(document.getElementById(tableId).tBodies[0].rows, function (row) {
      var text = row.getAttribute("data-text") || "";
      row.hidden = !(filters.every(function (select) {
        return select.value === "" || row.getAttribute("data-" + select.getAttribute("data-attr")) === select.value;
      }) && words.every(function (word) { return text.indexOf(word) !== -1; }));
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("select.row-filter"), function (select) {
    select.addEventListener("change", function () { applyFilters(select.getAttribute("data-table")); });
  });
  Array.prototype.forEach.call(document.querySelectorAll("input.text-filter"), function (input) {
    input.addEventListener("input", function () { applyFilters(input.getAttribute("data-table")); });
  });
})();
