// The attention explorer of visualizer.explore: one instance per root element.
// Everything it needs is in the page: no request, no module loader, no kernel.
// Drawing is on <canvas>; text reaches the page only through textContent and
// fillText, never as HTML, so a token that looks like markup is shown, not run.
(function () {
  "use strict";

  // Colormaps of visualizer.plot: "inferno" over images, "viridis" for matrices,
  // "tab10" for heads (256 RGB entries as hex, from matplotlib).
  var INFERNO = "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a07220b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b09643d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711ff1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0af98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0ffcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4";
  var VIRIDIS = "44015444025645045745055946075a46085c460a5d460b5e470d60470e6147106347116447136548146748166848176948186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f854240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f881fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad8128ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc743fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc8635ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21ad8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725";
  var HEAD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                     "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  var STEPS = 254;  // code c >= 1 stands for (c - 1) / 254 of the row's maximum
  var MAIN_SIZE = 360;  // css pixels of the longer side of the image views
  var THUMB_SIZE = 84;
  var LINE_CAP = 250000;  // head view: above this many lines, draw the hovered token's only

  function lut(hex) {
    var table = new Uint8Array(768);
    for (var i = 0; i < 768; i++) table[i] = parseInt(hex.substr(2 * i, 2), 16);
    return table;
  }
  var LUTS = {inferno: lut(INFERNO), viridis: lut(VIRIDIS)};

  function bytesOf(base64) {
    var text = atob(base64), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function el(tag, cls, parent, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(value) {
    if (value === 0) return "0";
    return Math.abs(value) >= 0.001 ? value.toFixed(4) : value.toExponential(2);
  }

  function Explorer(root) {
    var started = performance.now();
    var data = JSON.parse(root.querySelector("script.visualizer-explorer-data").textContent);
    var codes = bytesOf(data.codes);
    var scaleBytes = bytesOf(data.scales);
    var scales = new Float32Array(scaleBytes.buffer, 0, scaleBytes.length / 4);
    var layers = data.layers;
    var prefix = data.prefix;
    var self = this;
    this.timings = {setup: 0, firstPaint: null, redraws: []};

    // ---------------------------------------------------------------- data
    function rowValues(layer, headSlot, rowSlot, out) {
      var keys = layer.keys;
      var rowIndex = headSlot * layer.rows.length + rowSlot;
      var base = layer.codeOffset + rowIndex * keys;
      var step = scales[layer.scaleOffset + rowIndex] / STEPS;
      for (var k = 0; k < keys; k++) {
        var c = codes[base + k];
        out[k] = c === 0 ? 0 : (c - 1) * step;
      }
      return out;
    }
    // The row drawn for a head choice: one head, or the mean / max over heads.
    function fusedRow(layer, head, rowSlot) {
      var keys = layer.keys, out = new Float64Array(keys);
      if (typeof head === "number") return rowValues(layer, head, rowSlot, out);
      var one = new Float64Array(keys), count = layer.heads.length;
      for (var h = 0; h < count; h++) {
        rowValues(layer, h, rowSlot, one);
        for (var k = 0; k < keys; k++) {
          if (head === "max") { if (one[k] > out[k]) out[k] = one[k]; }
          else out[k] += one[k] / count;
        }
      }
      return out;
    }
    function rowSlotOf(layer, query) { return layer.rows.indexOf(query); }
    function labelsOf(name, count) {
      var list = name === "tokens" ? data.tokens : name === "query_tokens" ? data.queryTokens : null;
      if (list) return list;
      var made = [];
      for (var i = 0; i < count; i++) made.push(String(i));
      return made;
    }
    function headName(layer, slot) {
      return layer.heads[slot] < 0 ? "rollout" : "head " + layer.heads[slot];
    }
    function tokenName(index) {
      if (index < prefix) return index === 0 ? "CLS" : "reg " + index;
      return "patch " + (index - prefix);
    }

    // ---------------------------------------------------------------- page
    root.setAttribute("data-ready", "0");
    var fallback = root.querySelector(".vx-fallback");
    if (fallback) root.removeChild(fallback);
    var old = root.querySelector(".vx-app");
    if (old) root.removeChild(old);  // the same output drawn again
    var app = el("div", "vx-app", root);
    var bar = el("div", "vx-bar", app);
    el("span", "vx-label", bar, "layer");
    var layerSelect = el("select", "vx-layer", bar);
    layers.forEach(function (layer, index) {
      var option = el("option", null, layerSelect, layer.name + "  [" + layer.kind + "]");
      option.value = String(index);
    });
    el("span", "vx-label", bar, "head");
    var headSelect = el("select", "vx-head", bar);
    var viewBox = el("span", "vx-views", bar);
    var saveButton = el("button", "vx-save", bar, "save PNG");
    var notes = el("div", "vx-notes", app);
    var leftOut = data.leftOut ? el("div", "vx-warning", notes, "Left out of this page: " + data.leftOut) : null;
    var message = el("div", "vx-message", notes);
    var main = el("div", "vx-main", app);
    var left = el("div", "vx-left", main);
    var queryList = el("div", "vx-queries", left);
    var canvas = el("canvas", "vx-canvas", left);
    var prefixBox = el("div", "vx-prefix", left);
    var legend = el("canvas", "vx-legend", left);
    var readout = el("div", "vx-readout", left);
    var right = el("div", "vx-right", main);
    el("div", "vx-bound", app, data.errorBound);
    var context = canvas.getContext("2d");

    var photo = null;  // the image at its own pixels, on a canvas
    if (data.image) {
      var rgb = bytesOf(data.image.rgb);
      photo = document.createElement("canvas");
      photo.width = data.image.width;
      photo.height = data.image.height;
      var photoContext = photo.getContext("2d");
      var pixels = photoContext.createImageData(photo.width, photo.height);
      for (var p = 0, q = 0; p < rgb.length; p += 3, q += 4) {
        pixels.data[q] = rgb[p]; pixels.data[q + 1] = rgb[p + 1];
        pixels.data[q + 2] = rgb[p + 2]; pixels.data[q + 3] = 255;
      }
      photoContext.putImageData(pixels, 0, 0);
    }

    var state = {layer: 0, head: "mean", view: null, query: null, pinned: false, key: null};
    // Start on the model's last layer (the rollout option, when there, comes after it).
    layers.forEach(function (layer, index) { if (layer.heads[0] >= 0) state.layer = index; });
    var drawn = null;  // what the main view shows now, for state()
    var matrixCache = null;

    function viewsOf(layer) {
      return [layer.kind === "tokens" ? "head view" : layer.kind, "matrix"];
    }
    function currentLayer() { return layers[state.layer]; }

    function fillHeads() {
      var layer = currentLayer(), choices = [];
      if (state.view === "head view") choices.push(["all", "all heads"]);
      if (layer.heads.length > 1) choices.push(["mean", "mean of heads"], ["max", "max of heads"]);
      layer.heads.forEach(function (_, slot) { choices.push([String(slot), headName(layer, slot)]); });
      var keep = String(state.head);
      headSelect.textContent = "";
      choices.forEach(function (choice) {
        var option = el("option", null, headSelect, choice[1]);
        option.value = choice[0];
      });
      var values = choices.map(function (c) { return c[0]; });
      if (values.indexOf(keep) < 0) keep = values[0];
      headSelect.value = keep;
      state.head = parseHead(keep);
    }
    function parseHead(value) {
      return value === "mean" || value === "max" || value === "all" ? value : Number(value);
    }
    function fillViews() {
      var layer = currentLayer(), views = viewsOf(layer);
      if (views.indexOf(state.view) < 0) state.view = views[0];
      // The head view shows every head in its own colour, as BertViz does.
      if (state.view === "head view" && state.head === "mean") state.head = "all";
      if (state.view !== "head view" && state.head === "all") state.head = "mean";
      viewBox.textContent = "";
      views.forEach(function (view) {
        var button = el("button", view === state.view ? "vx-view vx-active" : "vx-view", viewBox, view);
        button.setAttribute("data-view", view);
        button.addEventListener("click", function () { setView(view); });
      });
    }
    function defaultQuery(layer) {
      if (layer.kind === "tokens" && state.view === "head view") return null;
      return layer.rows[0];
    }

    // ---------------------------------------------------------------- image views
    function imageFrame(layer) {
      var grid = layer.grid;
      var height = photo ? photo.height : grid[0], width = photo ? photo.width : grid[1];
      var zoom = MAIN_SIZE / Math.max(height, width);
      return {grid: grid, width: Math.round(width * zoom), height: Math.round(height * zoom)};
    }
    var scratch = document.createElement("canvas");  // one grid-sized canvas, reused per draw
    function heatCanvas(values, grid, start, top, cmap) {
      var cells = scratch;
      if (cells.width !== grid[1] || cells.height !== grid[0]) {
        cells.width = grid[1]; cells.height = grid[0];
      }
      var cellContext = cells.getContext("2d");
      var image = cellContext.createImageData(grid[1], grid[0]);
      var table = LUTS[cmap], count = grid[0] * grid[1];
      for (var i = 0; i < count; i++) {
        var level = top > 0 ? Math.min(255, Math.round(values[start + i] / top * 255)) : 0;
        image.data[4 * i] = table[3 * level];
        image.data[4 * i + 1] = table[3 * level + 1];
        image.data[4 * i + 2] = table[3 * level + 2];
        image.data[4 * i + 3] = 255;
      }
      cellContext.putImageData(image, 0, 0);
      return cells;
    }
    function patchMax(values, layer) {
      var top = 0, hottest = -1;
      for (var k = prefix; k < layer.keys; k++) if (values[k] > top) { top = values[k]; hottest = k - prefix; }
      return {top: top, hottest: hottest};
    }
    function outline(frame, token, color, dash) {
      if (token === null || token < prefix) return;
      var grid = frame.grid, patch = token - prefix;
      var cellWidth = frame.width / grid[1], cellHeight = frame.height / grid[0];
      context.save();
      context.strokeStyle = color; context.lineWidth = 2;
      if (dash) context.setLineDash([4, 3]);
      context.strokeRect((patch % grid[1]) * cellWidth + 1, Math.floor(patch / grid[1]) * cellHeight + 1,
                         cellWidth - 2, cellHeight - 2);
      context.restore();
    }
    function drawImageView(layer) {
      var frame = imageFrame(layer);
      canvas.width = frame.width; canvas.height = frame.height;
      var slot = rowSlotOf(layer, state.query);
      if (slot < 0) slot = 0;
      var query = layer.rows[slot];
      var head = state.head === "all" ? "mean" : state.head;
      var values = fusedRow(layer, head, slot);
      var peak = patchMax(values, layer);
      context.imageSmoothingEnabled = false;
      if (photo) context.drawImage(photo, 0, 0, frame.width, frame.height);
      context.globalAlpha = photo ? 0.6 : 1;
      context.drawImage(heatCanvas(values, frame.grid, prefix, peak.top, "inferno"), 0, 0, frame.width, frame.height);
      context.globalAlpha = 1;
      if (layer.kind === "cross" && data.boxes && data.boxes[query]) {
        var box = data.boxes[query], sx = frame.width / (photo ? photo.width : frame.grid[1]);
        var sy = frame.height / (photo ? photo.height : frame.grid[0]);
        context.strokeStyle = "#00e5ff"; context.lineWidth = 2;
        context.strokeRect(box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy);
      }
      if (layer.kind === "image") outline(frame, query, "#ff2d2d", false);
      outline(frame, state.key, "#ffffff", true);
      drawPrefix(values, peak.top);
      drawLegend(peak.top, state.key === null ? null : values[state.key], "inferno");
      drawThumbs(layer, slot, frame);
      drawn = {values: Array.prototype.slice.call(values), query: query, top: peak.top, hottestPatch: peak.hottest};
      var queryText = layer.kind === "cross" ? labelsOf(layer.queryLabels, 0)[query] || "query " + query : tokenName(query);
      var text = queryText + (state.pinned ? " (pinned: click again to follow the mouse)" : "");
      if (state.key !== null) text += "  →  " + tokenName(state.key) + ": " + fmt(values[state.key]);
      readout.textContent = text;
      var missing = layer.kind === "image" && layer.rows.length < layer.keys;
      message.textContent = missing ? "This capture holds the rows of " + layer.rows.map(tokenName).join(", ") +
        " only (" + layer.rows.length + " of " + layer.keys + " queries); hovering another patch needs the full maps: " +
        "capture without rows= (or embed them with explore(..., rows=None))." : "";
    }
    function drawPrefix(values, top) {
      prefixBox.textContent = "";
      for (var t = 0; t < prefix; t++) {
        var cell = el("button", "vx-cell", prefixBox, tokenName(t) + " " + fmt(values[t]));
        var level = top > 0 ? Math.min(255, Math.round(values[t] / top * 255)) : 0;
        var table = LUTS.inferno;
        cell.style.background = "rgb(" + table[3 * level] + "," + table[3 * level + 1] + "," + table[3 * level + 2] + ")";
        cell.style.color = level > 150 ? "#000" : "#fff";
        cell.setAttribute("data-token", String(t));
        cell.addEventListener("click", (function (token) {
          return function () { select(token, true); };
        })(t));
      }
    }
    function drawLegend(top, value, cmap) {
      legend.width = 260; legend.height = 34;
      var g = legend.getContext("2d"), table = LUTS[cmap];
      g.clearRect(0, 0, legend.width, legend.height);
      for (var x = 0; x < 200; x++) {
        var level = Math.round(x / 199 * 255);
        g.fillStyle = "rgb(" + table[3 * level] + "," + table[3 * level + 1] + "," + table[3 * level + 2] + ")";
        g.fillRect(x, 0, 1, 14);
      }
      g.fillStyle = "#222"; g.font = "11px sans-serif";
      g.fillText("0", 0, 27); g.fillText(fmt(top), 200 - g.measureText(fmt(top)).width, 27);
      if (value !== null && value !== undefined && top > 0) {
        var at = Math.min(199, Math.round(value / top * 199));
        g.fillRect(at - 1, 0, 3, 18);
        g.fillText(fmt(value), 204, 11);
      }
    }
    var thumbsDrawn = null;  // what the thumbnails show: redrawn only when it changes
    function drawThumbs(layer, slot, frame) {
      var showing = state.layer + "|" + slot + "|" + state.head;
      if (thumbsDrawn === showing) return;
      thumbsDrawn = showing;
      right.textContent = "";
      if (layer.heads.length < 2) return;
      layer.heads.forEach(function (_, h) {
        var box = el("div", "vx-thumb" + (state.head === h ? " vx-active" : ""), right);
        var thumb = el("canvas", null, box);
        var zoom = THUMB_SIZE / Math.max(frame.width, frame.height);
        thumb.width = Math.round(frame.width * zoom); thumb.height = Math.round(frame.height * zoom);
        var values = rowValues(layer, h, slot, new Float64Array(layer.keys));
        var g = thumb.getContext("2d");
        g.imageSmoothingEnabled = false;
        g.drawImage(heatCanvas(values, frame.grid, prefix, patchMax(values, layer).top, "inferno"), 0, 0, thumb.width, thumb.height);
        el("div", null, box, headName(layer, h));
        box.setAttribute("data-head", String(h));
        box.addEventListener("click", function () { setHead(h); });
      });
    }
    function keyAt(layer, event) {
      var bounds = canvas.getBoundingClientRect();
      var x = (event.clientX - bounds.left) / bounds.width, y = (event.clientY - bounds.top) / bounds.height;
      if (x < 0 || x >= 1 || y < 0 || y >= 1) return null;
      return prefix + Math.floor(y * layer.grid[0]) * layer.grid[1] + Math.floor(x * layer.grid[1]);
    }

    // ---------------------------------------------------------------- cross: query list
    var queryListOf = null;  // the layer whose queries the list holds
    function drawQueryList(layer) {
      queryList.style.display = layer.kind === "cross" && state.view === "cross" ? "" : "none";
      if (queryList.style.display === "none") return;
      if (queryListOf === layer) {
        // Built once per layer: rebuilding under the mouse would lose the hover.
        Array.prototype.forEach.call(queryList.children, function (item) {
          item.className = "vx-query" + (Number(item.getAttribute("data-query")) === state.query ? " vx-active" : "");
        });
        return;
      }
      queryListOf = layer;
      queryList.textContent = "";
      var names = labelsOf(layer.queryLabels, 0);
      layer.rows.forEach(function (query) {
        var item = el("button", "vx-query" + (query === state.query ? " vx-active" : ""), queryList,
                      data.queryTokens ? names[query] : "query " + query);
        item.setAttribute("data-query", String(query));
        item.addEventListener("mouseenter", function () { if (!state.pinned) select(query, false); });
        item.addEventListener("click", function () { select(query, !(state.pinned && state.query === query)); });
      });
    }

    // ---------------------------------------------------------------- token views
    var ROW = 18;
    function tokenGeometry(layer) {
      var queries = labelsOf(layer.queryLabels, layer.rows.length ? layer.rows[layer.rows.length - 1] + 1 : 0);
      var keys = labelsOf(layer.keyLabels, layer.keys);
      return {queries: queries, keys: keys, width: 460, left: 150, right: 310,
              height: ROW * Math.max(layer.rows.length, layer.keys) + 10};
    }
    function paddedKeys(layer) {
      // A key whose every embedded value is exactly zero is masked for every
      // query: padding.
      var padded = new Uint8Array(layer.keys).fill(1);
      var count = layer.heads.length * layer.rows.length;
      for (var r = 0; r < count; r++) {
        var base = layer.codeOffset + r * layer.keys;
        for (var k = 0; k < layer.keys; k++) if (codes[base + k] !== 0) padded[k] = 0;
      }
      return padded;
    }
    function maskedKeys(layer) {
      var padded = layer.padded || (layer.padded = paddedKeys(layer)), masked = [];
      for (var k = 0; k < padded.length; k++) if (padded[k]) masked.push(k);
      return masked;
    }
    function drawHeadView(layer) {
      var g = tokenGeometry(layer);
      canvas.width = g.width; canvas.height = g.height;
      context.clearRect(0, 0, g.width, g.height);
      var padded = layer.padded || (layer.padded = paddedKeys(layer));
      context.font = "12px sans-serif"; context.textBaseline = "middle";
      layer.rows.forEach(function (query, slot) {
        var hot = state.query === query;
        context.fillStyle = hot ? "#000" : state.query === null && state.key === null ? "#222" : "#999";
        context.textAlign = "right";
        context.fillText(g.queries[query], g.left - 6, 5 + ROW * slot + ROW / 2);
      });
      for (var k = 0; k < layer.keys; k++) {
        context.fillStyle = padded[k] ? "#bbb" : state.key === k ? "#000" : "#222";
        context.textAlign = "left";
        var label = g.keys[k] + (padded[k] ? " (masked)" : "");
        context.fillText(label, g.right + 6, 5 + ROW * k + ROW / 2);
      }
      var heads = state.head === "all" ? layer.heads.map(function (_, h) { return h; }) : [state.head];
      var lines = layer.rows.length * layer.keys * heads.length;
      var onlyHovered = lines > LINE_CAP && state.query === null && state.key === null;
      context.lineWidth = 2;
      var shown = [];  // the hovered query's row, per head drawn
      heads.forEach(function (head) {
        var color = typeof head === "number" ? HEAD_COLORS[layer.heads[head] % 10] : "#1f77b4";
        context.strokeStyle = color;
        layer.rows.forEach(function (query, slot) {
          if (state.query !== null && state.query !== query) return;
          if (onlyHovered) return;
          var values = fusedRow(layer, head, slot);
          if (state.query === query) shown.push(Array.prototype.slice.call(values));
          for (var k = 0; k < layer.keys; k++) {
            if (state.key !== null && state.key !== k) continue;
            if (values[k] <= 0) continue;
            context.globalAlpha = Math.min(1, values[k]);  // opacity is the weight, as in BertViz
            context.beginPath();
            context.moveTo(g.left, 5 + ROW * slot + ROW / 2);
            context.lineTo(g.right, 5 + ROW * k + ROW / 2);
            context.stroke();
          }
        });
      });
      context.globalAlpha = 1;
      right.textContent = "";
      if (state.head === "all") {
        layer.heads.forEach(function (_, h) {
          var chip = el("span", "vx-chip", right, headName(layer, h));
          chip.style.borderColor = HEAD_COLORS[layer.heads[h] % 10];
        });
      }
      prefixBox.textContent = "";
      legend.width = 0; legend.height = 0;
      // One head: its row; all heads: one row per head.
      drawn = {values: shown.length === 0 ? null : shown.length === 1 && state.head !== "all" ? shown[0] : shown,
               query: state.query};
      readout.textContent = onlyHovered ? "Hover a token: " + lines + " lines are too many to draw at once." :
        state.query !== null ? "query " + g.queries[state.query] :
        "Hover a token on the left (queries) or right (keys) to isolate it; line opacity is the weight.";
      message.textContent = "";
    }
    function tokenAt(layer, event) {
      var g = tokenGeometry(layer), bounds = canvas.getBoundingClientRect();
      var x = (event.clientX - bounds.left) * canvas.width / bounds.width;
      var y = (event.clientY - bounds.top) * canvas.height / bounds.height;
      var index = Math.floor((y - 5) / ROW);
      if (x < g.left + 20) return {query: layer.rows[index] !== undefined ? layer.rows[index] : null, key: null};
      if (x > g.right - 20 && index >= 0 && index < layer.keys) return {query: null, key: index};
      return {query: null, key: null};
    }

    // Where the matrix lies on the canvas: cells of `cell` px after margins
    // for the token labels (drawn when cells are tall enough to read them).
    var matrixFrame = null;
    function matrixLayout(layer) {
      var cell = Math.max(1, Math.min(28, Math.floor(520 / Math.max(layer.rows.length, layer.keys))));
      var labelled = layer.kind === "tokens" && cell >= 10;
      return {cell: cell, labelled: labelled, left: labelled ? 96 : 0, top: labelled ? 72 : 0};
    }
    function shortLabel(text) { return text.length > 14 ? text.slice(0, 13) + "…" : text; }
    function drawMatrix(layer) {
      var cell = matrixLayout(layer).cell, rowsCount = layer.rows.length, keys = layer.keys;
      var head = state.head === "all" ? "mean" : state.head;
      var cacheKey = state.layer + "|" + head;
      if (!matrixCache || matrixCache.key !== cacheKey) {
        var all = new Float64Array(rowsCount * keys), top = 0;
        for (var r = 0; r < rowsCount; r++) {
          all.set(fusedRow(layer, head, r), r * keys);
        }
        for (var i = 0; i < all.length; i++) if (all[i] > top) top = all[i];
        var cells = document.createElement("canvas");
        cells.width = keys; cells.height = rowsCount;
        var cellContext = cells.getContext("2d"), image = cellContext.createImageData(keys, rowsCount);
        var table = LUTS.viridis;
        for (i = 0; i < all.length; i++) {
          if (all[i] === 0) {  // exactly zero: masked (causal, padding)
            image.data[4 * i] = 215; image.data[4 * i + 1] = 215; image.data[4 * i + 2] = 215;
          } else {
            var level = Math.min(255, Math.round(all[i] / top * 255));
            image.data[4 * i] = table[3 * level]; image.data[4 * i + 1] = table[3 * level + 1];
            image.data[4 * i + 2] = table[3 * level + 2];
          }
          image.data[4 * i + 3] = 255;
        }
        cellContext.putImageData(image, 0, 0);
        matrixCache = {key: cacheKey, cells: cells, all: all, top: top};
      }
      var frame = matrixFrame = matrixLayout(layer), left = frame.left, top = frame.top;
      canvas.width = left + keys * cell; canvas.height = top + rowsCount * cell;
      context.imageSmoothingEnabled = false;
      context.drawImage(matrixCache.cells, left, top, keys * cell, rowsCount * cell);
      var queryNames = labelsOf(layer.queryLabels, layer.rows[rowsCount - 1] + 1);
      var keyNames = layer.kind === "tokens" ? labelsOf(layer.keyLabels, keys) : null;
      if (frame.labelled) {
        context.fillStyle = "#222"; context.font = Math.min(12, cell - 1) + "px sans-serif";
        context.textBaseline = "middle"; context.textAlign = "right";
        layer.rows.forEach(function (query, r) {
          context.fillText(shortLabel(queryNames[query]), left - 4, top + (r + 0.5) * cell);
        });
        context.textAlign = "left";
        for (var k = 0; k < keys; k++) {
          context.save();
          context.translate(left + (k + 0.5) * cell, top - 4);
          context.rotate(-Math.PI / 3);
          context.fillText(shortLabel(keyNames[k]), 0, 0);
          context.restore();
        }
      }
      var slot = state.query === null ? -1 : rowSlotOf(layer, state.query);
      context.strokeStyle = "#ff2d2d"; context.lineWidth = 1;
      if (slot >= 0) context.strokeRect(left + 0.5, top + slot * cell + 0.5, keys * cell - 1, cell);
      if (state.key !== null) context.strokeRect(left + state.key * cell + 0.5, top + 0.5, cell, rowsCount * cell - 1);
      var value = slot >= 0 && state.key !== null ? matrixCache.all[slot * keys + state.key] : null;
      prefixBox.textContent = "";
      right.textContent = "";
      drawLegend(matrixCache.top, value, "viridis");
      drawn = {values: slot >= 0 ? Array.prototype.slice.call(matrixCache.all.subarray(slot * keys, (slot + 1) * keys)) : null,
               query: slot >= 0 ? state.query : null};
      readout.textContent = slot >= 0 && state.key !== null ?
        "query " + (layer.kind === "image" ? tokenName(state.query) : queryNames[state.query]) + "  →  key " +
        (keyNames ? keyNames[state.key] : tokenName(state.key)) + ": " + (value === 0 ? "0 (masked)" : fmt(value)) :
        "Rows are queries, columns keys; grey cells are exactly zero (masked: causal or padding).";
      message.textContent = "";
    }
    function cellAt(layer, event) {
      var bounds = canvas.getBoundingClientRect(), frame = matrixFrame;
      var x = (event.clientX - bounds.left) * canvas.width / bounds.width - frame.left;
      var y = (event.clientY - bounds.top) * canvas.height / bounds.height - frame.top;
      var row = Math.floor(y / frame.cell), key = Math.floor(x / frame.cell);
      if (row < 0 || row >= layer.rows.length || key < 0 || key >= layer.keys) return null;
      return {query: layer.rows[row], key: key};
    }

    // ---------------------------------------------------------------- control
    function redraw() {
      var begin = performance.now();
      var layer = currentLayer();
      if (state.view === "matrix" || state.view === "head view") thumbsDrawn = null;
      drawQueryList(layer);
      if (state.view === "matrix") drawMatrix(layer);
      else if (state.view === "head view") drawHeadView(layer);
      else drawImageView(layer);
      root.setAttribute("data-layer", layer.name);
      root.setAttribute("data-view", state.view);
      root.setAttribute("data-head", String(state.head));
      root.setAttribute("data-query", state.query === null ? "" : String(state.query));
      var spent = performance.now() - begin;
      self.timings.redraws.push(spent);
      if (self.timings.redraws.length > 1000) self.timings.redraws.shift();
      return spent;
    }
    function select(query, pin) {
      var layer = currentLayer();
      if (query !== null && rowSlotOf(layer, query) < 0 && layer.kind !== "tokens") {
        state.key = query;  // a row this capture does not have: show its value in the row drawn
      } else {
        state.query = query;
        if (layer.kind === "image" && query !== null) state.key = query;
      }
      state.pinned = pin;
      return redraw();
    }
    function setLayer(index) {
      if (typeof index === "string") {
        index = layers.map(function (layer) { return layer.name; }).indexOf(index);
      }
      if (index < 0 || index >= layers.length) throw new Error("no layer " + index);
      state.layer = index; layerSelect.value = String(index);
      fillViews(); fillHeads();
      var layer = currentLayer();
      if (state.query === null || rowSlotOf(layer, state.query) < 0) state.query = defaultQuery(layer);
      return redraw();
    }
    function setHead(head) {
      headSelect.value = String(head);
      if (headSelect.value !== String(head)) throw new Error("no head option " + head);
      state.head = parseHead(String(head));
      return redraw();
    }
    function setView(view) {
      if (viewsOf(currentLayer()).indexOf(view) < 0) throw new Error("no view " + view);
      state.view = view; state.key = null;
      fillViews(); fillHeads();
      if (view === "head view") state.query = null;
      else if (state.query === null) state.query = defaultQuery(currentLayer());
      return redraw();
    }

    layerSelect.addEventListener("change", function () { setLayer(Number(layerSelect.value)); });
    headSelect.addEventListener("change", function () { setHead(headSelect.value); });
    canvas.addEventListener("mousemove", function (event) {
      var layer = currentLayer();
      if (state.view === "matrix") {
        var at = cellAt(layer, event);
        if (!at) return;
        state.key = at.key;
        if (!state.pinned) state.query = at.query;
        redraw();
      } else if (state.view === "head view") {
        if (state.pinned) return;
        var token = tokenAt(layer, event);
        state.query = token.query; state.key = token.key;
        redraw();
      } else {
        var key = keyAt(layer, event);
        if (key === null) return;
        if (layer.kind === "image" && !state.pinned) select(key, false);
        else { state.key = key; redraw(); }
      }
    });
    canvas.addEventListener("click", function (event) {
      var layer = currentLayer();
      if (state.view === "image") {
        var key = keyAt(layer, event);
        if (key !== null) select(key, !state.pinned);
      } else if (state.view === "head view") {
        state.pinned = !state.pinned;
        if (!state.pinned) { state.query = null; state.key = null; }
        redraw();
      } else {
        state.pinned = !state.pinned;
      }
    });
    function pngDataURL() {
      var sheet = document.createElement("canvas");
      var thumbs = right.querySelectorAll("canvas");
      var thumbWidth = thumbs.length ? THUMB_SIZE + 8 : 0;
      var columns = thumbs.length ? Math.ceil(thumbs.length / Math.max(1, Math.floor(canvas.height / (THUMB_SIZE + 8)))) : 0;
      sheet.width = canvas.width + columns * thumbWidth + 20;
      sheet.height = Math.max(canvas.height + legend.height + 40, 60);
      var g = sheet.getContext("2d");
      g.fillStyle = "#fff"; g.fillRect(0, 0, sheet.width, sheet.height);
      g.fillStyle = "#222"; g.font = "12px sans-serif";
      g.fillText(currentLayer().name + " · " + headSelect.options[headSelect.selectedIndex].text + " · " + readout.textContent, 4, 14);
      g.drawImage(canvas, 4, 22);
      if (legend.width) g.drawImage(legend, 4, 26 + canvas.height);
      var perColumn = Math.max(1, Math.floor(canvas.height / (THUMB_SIZE + 8)));
      for (var i = 0; i < thumbs.length; i++) {
        g.drawImage(thumbs[i], canvas.width + 14 + Math.floor(i / perColumn) * thumbWidth, 22 + (i % perColumn) * (THUMB_SIZE + 8));
      }
      return sheet.toDataURL("image/png");
    }
    saveButton.addEventListener("click", function () {
      var link = document.createElement("a");
      link.href = pngDataURL();
      link.download = "attention.png";
      link.click();
    });

    // The test and benchmark API: what is drawn, as numbers.
    this.hover = function (query) { return select(query, false); };
    this.pin = function (query) { return select(query, true); };
    this.setLayer = setLayer;
    this.setHead = setHead;
    this.setView = setView;
    this.pngDataURL = pngDataURL;
    this.layers = function () { return layers.map(function (layer) { return layer.name; }); };
    this.state = function () {
      var layer = currentLayer();
      return {layer: layer.name, layerIndex: state.layer, kind: layer.kind, view: state.view,
              head: state.head, heads: layer.heads, rows: layer.rows, query: state.query,
              key: state.key, pinned: state.pinned, drawn: drawn, message: message.textContent,
              readout: readout.textContent, leftOut: leftOut ? leftOut.textContent : null,
              maskedKeys: layer.kind === "tokens" ? maskedKeys(layer) : null,
              matrix: state.view === "matrix" ? matrixFrame : null};
    };

    fillViews(); fillHeads();
    state.query = defaultQuery(currentLayer());
    layerSelect.value = String(state.layer);
    redraw();
    this.timings.setup = performance.now() - started;
    this.timings.firstPaint = performance.now();
    root.setAttribute("data-ready", "1");
  }

  window.visualizerExplorers = window.visualizerExplorers || {};
  window.visualizerExplorer = function (root) {
    var explorer = new Explorer(root);
    window.visualizerExplorers[root.id] = explorer;
    return explorer;
  };
})();
