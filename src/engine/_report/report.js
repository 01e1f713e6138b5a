/* shoal run report: draws the timeline on a canvas and shows an action's details and logs on click.
   Data comes from the page's own JSON element; nothing is fetched. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var canvas = document.getElementById("timeline");
  var wrap = document.getElementById("timeline-wrap");
  var tip = document.getElementById("tip");
  var detail = document.getElementById("detail");
  var logView = document.getElementById("log-view");
  var logsHint = document.getElementById("logs-hint");

  var LABEL = 200, AXIS = 24, ROW = 12, GAP = 8, MAX_ROWS = 8, BAR = 44, PAD = 12;
  var FILL = ["#2563eb", "#dc2626", "#9ca3af", "#a855f7", "#d1d5db"];
  var STATES = ["succeeded", "failed", "cancelled", "running", "pending"];
  var CACHED = "#93c5fd", RETRY = "#f97316";

  var layout = [];   // per lane: {y, h, rows}
  var boxes = [];    // items mode: [x0, y0, x1, y1, itemIndex]

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (cls) { node.className = cls; }
    return node;
  }

  function seconds(v) {
    if (v === null || v === undefined) { return "-"; }
    if (v < 1e-3) { return (v * 1e6).toFixed(0) + " \u00b5s"; }
    if (v < 1) { return (v * 1e3).toFixed(1) + " ms"; }
    if (v < 120) { return v.toFixed(2) + " s"; }
    return (v / 60).toFixed(1) + " min";
  }

  function laneName(lane) { return lane.group ? lane.group + " / " + lane.task : lane.task; }

  // Items mode: pack each lane's boxes into rows (first row free at the box's start; past
  // MAX_ROWS, the row that frees first, so boxes may overlap there).
  function pack() {
    var perLane = data.lanes.map(function () { return []; });
    data.items.forEach(function (item, i) { perLane[item[0]].push(i); });
    var y = AXIS;
    layout = [];
    var rowOf = new Array(data.items.length);
    perLane.forEach(function (idx) {
      idx.sort(function (a, b) { return data.items[a][1] - data.items[b][1]; });
      var ends = [];
      idx.forEach(function (i) {
        var item = data.items[i], row = -1;
        for (var r = 0; r < ends.length; r++) { if (ends[r] <= item[1]) { row = r; break; } }
        if (row < 0 && ends.length < MAX_ROWS) { row = ends.length; ends.push(0); }
        if (row < 0) {
          row = 0;
          for (var k = 1; k < ends.length; k++) { if (ends[k] < ends[row]) { row = k; } }
        }
        ends[row] = Math.max(ends[row], item[2]);
        rowOf[i] = row;
      });
      var rows = Math.max(1, ends.length);
      layout.push({ y: y, h: rows * ROW, rows: rows });
      y += rows * ROW + GAP;
    });
    return { height: y + PAD, rowOf: rowOf };
  }

  function binnedLayout() {
    var y = AXIS;
    layout = data.lanes.map(function () { var l = { y: y, h: BAR, rows: 1 }; y += BAR + GAP; return l; });
    return { height: y + PAD };
  }

  function niceStep(span, target) {
    var raw = span / target, p = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (raw <= steps[i] * p) { return steps[i] * p; } }
    return 10 * p;
  }

  function draw() {
    var width = Math.max(400, wrap.clientWidth);
    var geo = data.binned ? binnedLayout() : pack();
    var ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(geo.height * ratio);
    canvas.style.height = geo.height + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, geo.height);
    var plot = width - LABEL - PAD;
    var x = function (t) { return LABEL + (t / data.span) * plot; };

    // Axis and grid.
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#eef0f3";
    var step = niceStep(data.span, Math.max(2, Math.floor(plot / 110)));
    for (var t = 0; t <= data.span + 1e-12; t += step) {
      var gx = Math.round(x(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(gx, AXIS - 6); ctx.lineTo(gx, geo.height - PAD); ctx.stroke();
      ctx.fillText(seconds(t), gx + 2, 12);
    }

    // Lane labels and bands.
    data.lanes.forEach(function (lane, i) {
      var l = layout[i];
      ctx.fillStyle = i % 2 ? "#fafafa" : "#f4f6f8";
      ctx.fillRect(LABEL, l.y, plot, l.h);
      ctx.fillStyle = "#1f2937";
      var name = laneName(lane);
      if (ctx.measureText(name).width > LABEL - 10) {
        while (name.length > 4 && ctx.measureText(name + "\u2026").width > LABEL - 10) { name = name.slice(0, -1); }
        name += "\u2026";
      }
      ctx.fillText(name, 4, l.y + Math.min(l.h, BAR) / 2 + 4);
    });

    if (data.binned) { drawBins(ctx, plot); } else { drawItems(ctx, x, geo.rowOf); }
  }

  function drawItems(ctx, x, rowOf) {
    boxes = [];
    // Succeeded boxes first: failures, retries and the rest are drawn over them, so stacked
    // boxes never hide what went wrong.
    var order = data.items.map(function (_, i) { return i; });
    var weight = function (item) { return (item[3] === 0 ? 0 : 2) + (item[4] > 1 ? 1 : 0); };
    order.sort(function (a, b) { return weight(data.items[a]) - weight(data.items[b]) || a - b; });
    order.forEach(function (i) {
      var item = data.items[i];
      var l = layout[item[0]];
      // Whole pixels, at least two wide: a microsecond action is still a visible box of its colour.
      var x0 = Math.floor(x(item[1])), x1 = Math.max(x0 + 2, Math.round(x(item[2])));
      var y0 = l.y + rowOf[i] * ROW + 1, h = ROW - 2;
      ctx.fillStyle = item[5] ? CACHED : FILL[item[3]];
      ctx.fillRect(x0, y0, x1 - x0, h);
      var attempts = item[7] || [];
      // Earlier attempts recorded with their own times (offloaded ones: lost to a host, or failed)
      // are drawn inside the box; the last attempt is the box itself.
      attempts.slice(0, -1).forEach(function (a) {
        if (a[5] === null || a[6] === null) { return; }
        ctx.fillStyle = a[1] === "lost" ? "#fbbf24" : "#fca5a5";
        var ax0 = x(a[5]);
        ctx.fillRect(ax0, y0 + 2, Math.max(1, x(a[6]) - ax0), h - 4);
      });
      if (item[4] > 1) {  // retried: an orange band along the top of the box
        ctx.fillStyle = RETRY;
        ctx.fillRect(x0, y0, x1 - x0, 3);
      }
      boxes.push([x0, y0, x1, y0 + h, i]);
    });
  }

  function drawBins(ctx, plot) {
    var n = data.lanes.length ? data.lanes[0].busy.length : 0;
    var w = plot / Math.max(1, n);
    data.lanes.forEach(function (lane, i) {
      var l = layout[i];
      var top = 0;
      for (var b = 0; b < n; b++) { if (lane.busy[b] > top) { top = lane.busy[b]; } }
      lane.top = top;
      for (b = 0; b < n; b++) {
        var bx = LABEL + b * w;
        if (lane.busy[b] > 0 && top > 0) {
          var bh = Math.max(1, (lane.busy[b] / top) * (l.h - 6));
          ctx.fillStyle = FILL[0];
          ctx.fillRect(bx, l.y + l.h - bh, Math.max(1, w - 0.5), bh);
        }
        if (lane.retried[b] > 0) { ctx.fillStyle = RETRY; ctx.fillRect(bx, l.y, Math.max(1, w - 0.5), 3); }
        if (lane.failed[b] > 0) { ctx.fillStyle = FILL[1]; ctx.fillRect(bx, l.y + 3, Math.max(1, w - 0.5), 3); }
      }
      // Actions started per bin, as a line: short actions hardly show as running, but their starts do.
      var most = 0;
      for (b = 0; b < n; b++) { if (lane.started[b] > most) { most = lane.started[b]; } }
      if (most > 0) {
        ctx.strokeStyle = "#111827"; ctx.lineWidth = 1; ctx.beginPath();
        for (b = 0; b < n; b++) {
          var sy = l.y + l.h - 1 - (lane.started[b] / most) * (l.h - 8);
          if (b === 0) { ctx.moveTo(LABEL + (b + 0.5) * w, sy); } else { ctx.lineTo(LABEL + (b + 0.5) * w, sy); }
        }
        ctx.stroke();
      }
      ctx.fillStyle = "#374151";
      ctx.fillText("max " + top.toFixed(top < 10 ? 1 : 0) + " at once; line: started per bin (max " + most + ")",
        LABEL + 4, l.y + 14);
    });
  }

  function laneAt(y) {
    for (var i = 0; i < layout.length; i++) { if (y >= layout[i].y && y < layout[i].y + layout[i].h) { return i; } }
    return -1;
  }

  function pick(evt) {
    var r = canvas.getBoundingClientRect();
    var px = evt.clientX - r.left, py = evt.clientY - r.top;
    if (!data.binned) {
      for (var k = boxes.length - 1; k >= 0; k--) {
        var b = boxes[k];
        if (px >= b[0] - 1 && px <= b[2] + 1 && py >= b[1] && py <= b[3]) { return { item: b[4], px: px, py: py }; }
      }
      return { px: px, py: py };
    }
    var lane = laneAt(py);
    var n = lane >= 0 ? data.lanes[lane].busy.length : 0;
    var plot = canvas.clientWidth - LABEL - PAD;
    var bin = Math.floor(((px - LABEL) / plot) * n);
    if (lane < 0 || bin < 0 || bin >= n) { return { px: px, py: py }; }
    return { lane: lane, bin: bin, px: px, py: py };
  }

  function describe(hit) {
    if (hit.item !== undefined) {
      var item = data.items[hit.item];
      return laneName(data.lanes[item[0]]) + " \u00b7 " + STATES[item[3]] + " \u00b7 " + seconds(item[2] - item[1]);
    }
    if (hit.lane !== undefined) {
      var lane = data.lanes[hit.lane], w = data.span / lane.busy.length;
      return laneName(lane) + " \u00b7 " + seconds(hit.bin * w) + "\u2013" + seconds((hit.bin + 1) * w) +
        " \u00b7 " + lane.busy[hit.bin].toFixed(1) + " at once";
    }
    return "";
  }

  function table(rows) {
    var t = el("table");
    rows.forEach(function (row) {
      var tr = el("tr");
      tr.appendChild(el("th", row[0]));
      tr.appendChild(el("td", row[1]));
      t.appendChild(tr);
    });
    return t;
  }

  function showLogs(key) {
    var lines = data.logs[key] || [];
    logView.textContent = lines.map(function (l) {
      return (l[1] === "stdout" ? "" : "[" + l[1] + "] ") + l[2];
    }).join("\n");
    logsHint.textContent = lines.length ? "Logs of action " + key + " (" + lines.length + " line(s)):"
      : "Action " + key + " printed and logged nothing" + (data.logs_cut ? " that the report kept." : ".");
  }

  function showItem(i) {
    var item = data.items[i], key = data.keys[item[6]], lane = data.lanes[item[0]];
    detail.textContent = "";
    detail.appendChild(el("h3", "Action " + key));
    detail.appendChild(table([
      ["Task", lane.task], ["Group", lane.group || "-"], ["State", STATES[item[3]] + (item[5] ? " (cached)" : "")],
      ["Attempts", item[4]], ["Started", "+" + seconds(item[1])], ["Took", seconds(item[2] - item[1])]
    ]));
    var attempts = item[7] || [];
    if (attempts.length) {
      var t = el("table");
      var head = el("tr");
      ["attempt", "state", "target", "backend", "where", "took"].forEach(function (h) { head.appendChild(el("th", h)); });
      t.appendChild(head);
      attempts.forEach(function (a) {
        var tr = el("tr");
        var took = a[5] !== null && a[6] !== null ? seconds(a[6] - a[5]) : "-";
        [a[0], a[1], a[2], a[3], a[4] || "-", took].forEach(function (v) { tr.appendChild(el("td", v)); });
        t.appendChild(tr);
      });
      detail.appendChild(el("h4", "Where each attempt ran"));
      detail.appendChild(t);
    }
    showLogs(key);
  }

  function showBin(laneIndex, bin) {
    var lane = data.lanes[laneIndex], w = data.span / lane.busy.length;
    detail.textContent = "";
    detail.appendChild(el("h3", laneName(lane) + ", " + seconds(bin * w) + " to " + seconds((bin + 1) * w)));
    detail.appendChild(table([
      ["Running at once (mean)", lane.busy[bin].toFixed(2)], ["Started", lane.started[bin]],
      ["Failed", lane.failed[bin]], ["Retried", lane.retried[bin]]
    ]));
    var places = Object.keys(lane.places);
    if (places.length) {
      detail.appendChild(el("h4", "Where this lane's attempts ran"));
      detail.appendChild(table(places.map(function (p) { return [p, lane.places[p]]; })));
    }
  }

  canvas.addEventListener("mousemove", function (evt) {
    var text = describe(pick(evt));
    if (!text) { tip.style.display = "none"; return; }
    var r = canvas.getBoundingClientRect();
    tip.textContent = text;
    tip.style.display = "block";
    tip.style.left = Math.min(evt.clientX - r.left + 12, wrap.clientWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = (evt.clientY - r.top + 12) + "px";
  });
  canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  canvas.addEventListener("click", function (evt) {
    var hit = pick(evt);
    if (hit.item !== undefined) { showItem(hit.item); } else if (hit.lane !== undefined) { showBin(hit.lane, hit.bin); }
  });
  Array.prototype.forEach.call(document.querySelectorAll("tr.pick"), function (tr) {
    tr.addEventListener("click", function () {
      Array.prototype.forEach.call(document.querySelectorAll("tr.pick.selected"), function (o) { o.classList.remove("selected"); });
      tr.classList.add("selected");
      var key = tr.getAttribute("data-key");
      var found = data.keys.indexOf(key);
      if (found >= 0) {
        for (var i = 0; i < data.items.length; i++) { if (data.items[i][6] === found) { showItem(i); return; } }
      }
      showLogs(key);
    });
  });
  var pending = 0;
  window.addEventListener("resize", function () {
    if (pending) { return; }
    pending = window.requestAnimationFrame(function () { pending = 0; draw(); });
  });
  draw();
}());
